"""The helpers every kernel family shares (dz_kernels/_common.py), on the device of the suite (CUDA when present,
else the Triton interpreter): the hand rounding to bfloat16, float16 and E4M3 against torch's own conversions
(ties, near-ties, subnormals, the sign of zero, saturation, infinities, NaN), the NaN-propagating amax, the FP8
scale, and the output-poisoning hook."""
import torch

import triton
import triton.language as tl

from dz_kernels import _common as cm
from dz_kernels.testing import poison_outputs

from conftest import DEVICE

FP8 = torch.float8_e4m3fn


@triton.jit
def _round_kernel(X, BF, HF, Q, F8, R, V, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0.0)
    tl.store(BF + offs, cm.cast_rne(x, BF.dtype.element_ty), mask=m)
    tl.store(HF + offs, cm.cast_rne(x, HF.dtype.element_ty), mask=m)
    tl.store(Q + offs, cm.e4m3_bits(x), mask=m)
    tl.store(F8 + offs, cm.cast_rne(x, F8.dtype.element_ty), mask=m)
    tl.store(R + offs, cm.e4m3_round(x), mask=m)
    tl.store(V + offs, cm.e4m3_value(tl.load(F8 + offs, mask=m, other=0.0)), mask=m)


@triton.jit
def _amax_kernel(X, A, S, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * C + cols, mask=cols < C, other=0.0)
    amax = cm.nan_amax(x, 0)
    tl.store(A + row, amax)
    tl.store(S + row, cm.fp8_scale_tl(amax, 1e-12))


def _run_round(x: torch.Tensor):
    x = x.float().contiguous().to(DEVICE)
    n = x.numel()
    bf = cm.poisoned((n,), torch.bfloat16, x.device)
    hf = cm.poisoned((n,), torch.float16, x.device)
    q = cm.poisoned((n,), torch.uint8, x.device)
    f8 = cm.poisoned((n,), FP8, x.device)
    r, v = cm.poisoned((n,), torch.float32, x.device), cm.poisoned((n,), torch.float32, x.device)
    _round_kernel[(triton.cdiv(n, 1024),)](x, bf, hf, q, f8, r, v, n, BLOCK=1024)
    return x, bf, hf, q, f8, r, v


def _e4m3_probe_values() -> torch.Tensor:
    """Every E4M3 value, the midpoints between neighbours (ties) and one float32 ulp either side of each, zeros,
    values beyond 448, infinities, NaN, tiny and huge numbers, both signs."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()       # 0 .. 448, NaN (0x7F) left out
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([mids, mids.nextafter(torch.full_like(mids, 1e9)), mids.nextafter(torch.zeros_like(mids)),
                      grid.nextafter(torch.full_like(grid, 1e9)), grid.nextafter(torch.zeros_like(grid))])
    special = torch.tensor([0.0, 448.0, 449.0, 463.9, 464.0, 465.0, 1e6, 1e30, float("inf"), 2.0 ** -10,
                            2.0 ** -10 * 1.0000001, 2.0 ** -11, 1e-30, 1e-45, 0.0153, 0.015625 * 0.999])
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(4000, generator=g) * torch.logspace(-4, 3, 4000)
    pos = torch.cat([grid, mids, near, special])
    return torch.cat([pos, -pos, rand, torch.tensor([float("nan"), -float("nan"), -0.0])])


def test_e4m3_bits_match_torch_conversion():
    x, _, _, q, f8, r, v = _run_round(_e4m3_probe_values())
    want = torch.clamp(x, -448.0, 448.0).to(FP8).view(torch.uint8)
    nan = torch.isnan(x)
    assert torch.equal(q[~nan], want[~nan]), (x[~nan][q[~nan] != want[~nan]][:8], q[~nan][q[~nan] != want[~nan]][:8])
    assert (q[nan] == 0x7F).all(), "NaN must give the E4M3 NaN byte"
    assert torch.equal(f8.view(torch.uint8), q), "cast_rne to float8e4nv stores the same bytes"
    neg_zero = (x == 0) & torch.signbit(x)
    assert (q[neg_zero] == 0x80).all(), "-0 keeps its sign"
    want_v = q.view(FP8).float()
    assert torch.equal(r.view(torch.int32)[~nan], want_v.view(torch.int32)[~nan]), "e4m3_round: the byte's value"
    assert torch.equal(v.view(torch.int32)[~nan], want_v.view(torch.int32)[~nan]), "e4m3_value decodes the byte"
    assert torch.isnan(r[nan]).all() and torch.isnan(v[nan]).all()


def test_bf16_and_fp16_rounding_match_torch_conversion():
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    halfway_bf16 = (torch.randn(2000, generator=g).bfloat16().float().view(torch.int32) | 0x8000).view(torch.float32)
    halfway_f16 = torch.randn(2000, generator=g).half().float()
    halfway_f16 = halfway_f16 + halfway_f16.abs() * 2.0 ** -11                    # exactly half a float16 ulp
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.0, 65520.0, 1e38, 3.4e38,
                            2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.5, 6.0e-8, 1e-40, -1e-40])
    x = torch.cat([x, halfway_bf16, halfway_f16, special, torch.logspace(-30, 30, 3000)])
    x, bf, hf, _, _, _, _ = _run_round(x)
    assert torch.equal(bf.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(hf.view(torch.int16), x.to(torch.float16).view(torch.int16))
    nan = torch.tensor([float("nan")] * 4)
    _, bf, hf, _, _, _, _ = _run_round(nan)
    assert torch.isnan(bf).all() and torch.isnan(hf).all()


def test_nan_amax_and_fp8_scale():
    dev = DEVICE
    x = torch.randn(5, 100, generator=torch.Generator().manual_seed(2)).to(dev)
    x[1, 17] = float("nan")
    x[2] = 0.0
    x[3, 5] = float("inf")
    x[4, 99] = -float("nan")
    a, s = cm.poisoned((5,), torch.float32, dev), cm.poisoned((5,), torch.float32, dev)
    _amax_kernel[(5,)](x, a, s, 100, BLOCK=128)
    want = x.abs().amax(dim=1)
    torch.testing.assert_close(a, want, equal_nan=True)
    assert torch.isnan(a[1]) and torch.isnan(a[4]) and a[2] == 0 and a[3] == float("inf")
    assert torch.equal(s.nan_to_num(7.0), cm.fp8_scale(want).nan_to_num(7.0)), "kernel and torch scales agree"
    assert cm.fp8_scale(torch.zeros(())) > 0, "the floor keeps an all-zero group finite"


def test_fp8_scale_is_an_ieee_division():
    """fp8_scale divides (PyTorch on CUDA multiplies by the reciprocal of a Python-scalar divisor instead)."""
    amax = torch.rand(100000, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float() * 1e3
    want = (amax.double() / 448.0).float()                      # exact division rounded once to float32
    dev = DEVICE
    assert torch.equal(cm.fp8_scale(amax.to(dev)).cpu(), want)


def test_poison_outputs_hook():
    """The hook the suite turns on for every test (conftest): on, off, nested, restored."""
    assert cm._POISON_OUTPUTS[0], "tests/conftest.py poisons every kernel output"
    with poison_outputs(False):
        assert not cm._POISON_OUTPUTS[0]
        with poison_outputs():
            assert torch.isnan(cm.empty((4,), torch.float32, "cpu")).all()
            assert (cm.empty((3,), FP8, "cpu").view(torch.uint8) == 0x7F).all()
            assert (cm.empty((2,), torch.int32, "cpu") == -1).all()
        assert not cm._POISON_OUTPUTS[0]
    assert cm._POISON_OUTPUTS[0]


def test_kernels_run_where_the_suite_says():
    """CUDA when present, else the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton loads)."""
    assert cm.kernels_interpreted() == (not torch.cuda.is_available())
    assert cm.triton_runs_on(torch.zeros(1, device=DEVICE))


# ------------------------------------------------------------------------------- custom ops and their eager calls
def _counting(monkeypatch, op):
    """Counts the calls `cm.call` makes to op's own function directly (the op's dispatcher path does not count)."""
    n = {"direct": 0}
    fn = cm._OP_FUNCTIONS[op]

    def counted(*a):
        n["direct"] += 1
        return fn(*a)
    monkeypatch.setitem(cm._OP_FUNCTIONS, op, counted)
    return n


def test_call_runs_the_function_in_plain_eager_and_the_op_otherwise(monkeypatch):
    """cm.call skips the dispatcher only where nothing needs it: no autograd to record, no dispatch mode, no
    torch.compile tracing; the results are the same bits either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dz_kernels import fused
    from dz_kernels.fused.ops import _gelu_tanh_op

    n = _counting(monkeypatch, _gelu_tanh_op)
    x = torch.randn(3, 37, 64, device=DEVICE)
    with torch.no_grad():
        y_direct = fused.gelu_tanh(x)
    assert n["direct"] == 1
    y_grad_mode = fused.gelu_tanh(x)                    # grad mode on, nothing requires grad: still direct
    assert n["direct"] == 2 and torch.equal(y_grad_mode, y_direct)

    xg = x.clone().requires_grad_(True)
    y_op = fused.gelu_tanh(xg)                          # autograd to record: the op, with its backward
    assert n["direct"] == 2 and y_op.grad_fn is not None
    assert torch.equal(y_op.detach(), y_direct)
    y_op.sum().backward()                               # the backward op runs directly (grad mode is off there)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen() as mode:               # a dispatch mode sees the op itself
        y_mode = fused.gelu_tanh(x)
    assert any("dz.gelu_tanh" in o for o in mode.ops), mode.ops
    assert n["direct"] == 2 and torch.equal(y_mode, y_direct)

    calls_before = n["direct"]
    compiled = torch.compile(lambda t: fused.gelu_tanh(t), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        y_compiled = compiled(x)
    assert torch.equal(y_compiled, y_direct)
    assert n["direct"] == calls_before                  # traced as the op: fake tensors never reach the function


def test_plain_eager_refuses_tensor_subclasses_and_grad():
    t = torch.zeros(2)
    assert cm.plain_eager((t, None, 3, "x"))
    assert not cm.plain_eager((t.requires_grad_(True),))
    with torch.no_grad():
        assert cm.plain_eager((t,))
    assert cm.plain_eager((torch.nn.Parameter(torch.zeros(2), requires_grad=False),))
    assert not cm.plain_eager((torch.empty(2, device="meta"),))

    class Sub(torch.Tensor):
        pass
    assert not cm.plain_eager((torch.zeros(2).as_subclass(Sub),))


def test_host_cdiv_and_next_pow2_equal_tritons():
    """The launchers' host helpers give Triton's values (triton.cdiv / next_power_of_2 cost 2.6 us a call)."""
    for n in range(20001):
        assert cm.next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 16, 64, 128, 8192):
            assert cm.cdiv(n, b) == triton.cdiv(n, b), (n, b)
