"""Triton device functions shared by the FP8 and NVFP4 kernels, and their one GEMM launch rule (launch_gemm).

E4M3 rounding: `_round_to_e4m3` rounds a float32 to the nearest E4M3 value (ties to even) before the cast to
float8e4nv. On the GPU the cast itself rounds to nearest-even, so this changes nothing there; the Triton CPU
interpreter's float->fp8 cast (triton 3.9) rounds half up and ignores the bits below the first dropped one, so
without this step the interpreter would not reproduce the GPU (or torch) bits. The cast of an exactly
representable value is exact in both.

E2M1 codes: `_e2m1_encode` / `_e2m1_decode`, the formats.py rules.

The fused GEMM epilogue:
    out = residual + gate * act(acc + bias)          each term optional, float32 math, one rounding at the store

act is GELU with the tanh approximation (the Wan FFN): gelu(x) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
which equals 0.5 x (1 + tanh(u)). gate and residual are [M, N] tiles read through (row, column) strides, so a gate
shared by all tokens is passed with row stride 0.
"""
import triton
import triton.language as tl

# Fixed tiles for the CPU interpreter (autotuning would run every config there); the GPU uses the autotuned kernel.
INTERPRET_GEMM = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}


def launch_gemm(kernel, tuned, M: int, N: int, args: tuple, flags: dict, interpreting: bool,
                config: dict | None = None) -> None:
    """Launch a grouped-tile GEMM kernel over an M x N output: the plain kernel with INTERPRET_GEMM tiles in the
    interpreter; on a GPU the plain kernel at `config` (a config table entry: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps, num_stages) when one is given and it does not say autotune, else the autotuned wrapper `tuned`."""
    if interpreting:
        cfg = INTERPRET_GEMM
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        kernel[grid](*args, **flags, **cfg, num_warps=1)
    elif config is not None and not config.get("autotune", False):
        tiles = {k: int(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
        kernel[grid](*args, **flags, **tiles, num_warps=int(config["num_warps"]),
                     num_stages=int(config["num_stages"]))
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        tuned[grid](*args, **flags)


ACT_NONE = 0
ACT_GELU_TANH = 1
ACTIVATIONS = {None: ACT_NONE, "none": ACT_NONE, "gelu_tanh": ACT_GELU_TANH}


def activation_code(activation) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; expected None or 'gelu_tanh'")
    return ACTIVATIONS[activation]


@triton.jit
def _round_to_e4m3(v):
    """float32 v with |v| <= 448 -> the nearest E4M3 value as float32 (ties to even; sign kept, -0 included).

    Adding c = 1.5 * 2^(e + 20), e = max(exponent(v), -6), makes a float32 whose ulp is 2^(e - 3), the E4M3
    quantum of v's binade (2^-9 for the subnormals), so the float32 addition does the rounding; subtracting c back
    is exact."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    c = (((e + 147) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    r = (tl.abs(v) + c) - c
    return tl.where(bits < 0, -r, r)


@triton.jit
def _cast_out(x, dtype: tl.constexpr):
    """float32 -> the output dtype. bfloat16 is rounded to nearest-even by hand first (what the GPU's cast does;
    the interpreter's cast rounds half up), so interpreter and GPU store the same bits. float16 / float32 cast
    directly (the interpreter may differ from the GPU by one float16 ulp)."""
    if dtype == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _e2m1_encode(v):
    """float32 -> int32 E2M1 code: round to nearest, ties to even, saturate at 6; sign bit = (v < 0)."""
    a = tl.abs(v)
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    return code + (v < 0).to(tl.int32) * 8


@triton.jit
def _e2m1_decode(c):
    """4-bit E2M1 code (any int type, upper bits ignored) -> float32 value."""
    c = c.to(tl.int32) & 15
    e = (c >> 1) & 3
    m = c & 1
    mag = tl.where(e == 0, m, (2 + m) << tl.maximum(e - 1, 0)).to(tl.float32) * 0.5
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def _gelu_tanh(x):
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    # the exponent is capped so that exp stays finite; where the cap applies (x < -11) the result is below 2e-34 |x|
    return x / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))


@triton.jit
def _epilogue_store(acc, offs_m, offs_n, M, N,
                    BIAS, GATE, stride_gm, stride_gn, RES, stride_rm, stride_rn, OUT, stride_om,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr):
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if ACT == 1:
        acc = _gelu_tanh(acc)
    if HAS_GATE:
        g = tl.load(GATE + rows * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
        acc = acc * g
    if HAS_RES:
        r = tl.load(RES + rows * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
        acc = acc + r
    tl.store(OUT + rows * stride_om + offs_n[None, :], _cast_out(acc, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped along M so consecutive programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n
