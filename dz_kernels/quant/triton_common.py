"""Triton device functions shared by the FP8 and NVFP4 kernels, and their one GEMM launch rule (launch_gemm).

Rounding to a storage format (E4M3 scales, bf16/fp16 outputs) goes through dz_kernels._common (cast_rne,
e4m3_bits): the same bits on the GPU and in the Triton CPU interpreter.

E2M1 codes: `_e2m1_encode` / `_e2m1_decode`, the reference.py rules. `_unpack_tile` turns packed E2M1 bytes and
their block scales into values; `_w4a16_tile_dot` is one K step of a W4A16 GEMM (the tiled kernel of
triton_nvfp4.py and the split-K kernel of triton_nvfp4_splitk.py share it).

The fused GEMM epilogue:
    out = residual + gate * act(acc + bias)          each term optional, float32 math, one rounding at the store

act is GELU with the tanh approximation (the Wan FFN): gelu(x) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
which equals 0.5 x (1 + tanh(u)). gate and residual are [M, N] tiles read through (row, column) strides, so a gate
shared by all tokens is passed with row stride 0.
"""
import triton
import triton.language as tl

from .._common import cast_rne, cdiv, e4m3_value

# Fixed tiles for the CPU interpreter (autotuning would run every config there); the GPU uses the config table's
# tiles for the shape where a sweep measured them, else the autotuned kernel.
INTERPRET_GEMM = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}


def launch_gemm(kernel, tuned, M: int, N: int, args: tuple, flags: dict, interpreting: bool,
                config: dict | None = None) -> None:
    """Launch a grouped-tile GEMM kernel over an M x N output: the plain kernel with INTERPRET_GEMM tiles in the
    interpreter; on a GPU the plain kernel at `config` (a config table entry: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps, num_stages) when one is given and it does not say autotune, else the autotuned wrapper `tuned`."""
    if interpreting:
        cfg = INTERPRET_GEMM
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
        kernel[grid](*args, **flags, **cfg, num_warps=1)
    elif config is not None and not config.get("autotune", False):
        tiles = {k: int(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        grid = (cdiv(M, tiles["BLOCK_M"]) * cdiv(N, tiles["BLOCK_N"]),)
        kernel[grid](*args, **flags, **tiles, num_warps=int(config["num_warps"]),
                     num_stages=int(config["num_stages"]))
    else:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        tuned[grid](*args, **flags)


ACT_NONE = 0
ACT_GELU_TANH = 1
ACTIVATIONS = {None: ACT_NONE, "none": ACT_NONE, "gelu_tanh": ACT_GELU_TANH}


def activation_code(activation) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; expected None or 'gelu_tanh'")
    return ACTIVATIONS[activation]


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
def _unpack_tile(packed, scale_per_byte, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """packed uint8 [ROWS, BLOCK_K/2] and the float32 block scale of each byte [ROWS, BLOCK_K/2] ->
    float32 [ROWS, BLOCK_K] values (element 2j from the low nibble, 2j+1 from the high nibble)."""
    lo = _e2m1_decode(packed) * scale_per_byte
    hi = _e2m1_decode(packed >> 4) * scale_per_byte
    return tl.reshape(tl.join(lo, hi), (ROWS, BLOCK_K))


@triton.jit
def _scale_per_byte(S, rows, stride_s, mask_rows, p0, p_end, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 [ROWS, BLOCK_K/2]: the E4M3 block scale of each packed byte p0 .. p0 + BLOCK_K/2 of the rows `rows`
    (one scale per 8 bytes, decoded by hand: the interpreter reads the NaN byte as a number; 0 for bytes >= p_end
    and rows not in mask_rows). The [ROWS, BLOCK_K/16] scales are loaded once each and broadcast in registers."""
    sb = p0 // 8 + tl.arange(0, BLOCK_K // 16)
    smask = mask_rows[:, None] & (sb * 8 < p_end)[None, :]
    s = e4m3_value(tl.load(S + rows * stride_s + sb[None, :], mask=smask, other=0.0))
    return tl.reshape(tl.broadcast_to(s[:, :, None], (ROWS, BLOCK_K // 16, 8)), (ROWS, BLOCK_K // 2))


@triton.jit
def _w4a16_tile_dot(acc, x, W, WS, w_rows, stride_wn, stride_wsn, mask_n, p0, p_end,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + x @ (e2m1(w) * ws)^T for one K step: x [BLOCK_M, BLOCK_K] (16-bit, masked by the caller), the packed
    weight bytes p0 .. p0 + BLOCK_K/2 (those < p_end; p0 and p_end multiples of 8, as K is of 16) of rows w_rows and
    their E4M3 scales (one per 8 bytes, decoded by hand: the interpreter reads the NaN byte as a number), unpacked in
    registers (exact in bf16). The bytes are one contiguous [BLOCK_N, BLOCK_K/2] load (vector loads on the GPU), the
    scales come from _scale_per_byte."""
    p = p0 + tl.arange(0, BLOCK_K // 2)
    wp = tl.load(W + w_rows * stride_wn + p[None, :], mask=mask_n[:, None] & (p < p_end)[None, :], other=0)
    ws = _scale_per_byte(WS, w_rows, stride_wsn, mask_n, p0, p_end, BLOCK_N, BLOCK_K)
    w = _unpack_tile(wp, ws, BLOCK_N, BLOCK_K)
    if INTERPRET:  # the interpreter's bf16 dot is wrong; float32 operands give the exact products
        return tl.dot(x.to(tl.float32), tl.trans(w), acc)
    return tl.dot(x, tl.trans(w.to(x.dtype)), acc)


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
    tl.store(OUT + rows * stride_om + offs_n[None, :], cast_rne(acc, OUT.dtype.element_ty), mask=mask)


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
