"""Pre-quantized FP8 activations (dz_kernels.quant.Float8Rows): a per-token Float8Linear given the rows of x computes
exactly what it computes from x; the fused LayerNorm + modulate's FP8 output is the rowwise quantizer of its float32
result; the DreamZero block quantizes its norm's output once for q, k and v (and once for the FFN's first linear)
in inference, with the reference ops and with apply_'s fused norm, and still traces whole under torch.compile.
Runs on the suite's device (tests/conftest.py: the Triton interpreter here, the GPU where present); float64
oracles on the CPU; kernel outputs NaN-poisoned (conftest)."""
import pytest
import torch
import torch.nn.functional as TF
from conftest import DEVICE
from test_model_compile_dtypes import policy_inputs, run_policy, train_inputs
from test_quant_dispatch import fp8_table  # noqa: F401  (the fixture)
from tiny import tiny_model

from dreamzero.engine import PolicyConfig
from dz_kernels import ApplyConfig, apply_, fused
from dz_kernels.fused.reference import layernorm_modulate_reference
from dz_kernels.quant import (Float8DynamicActivationFloat8Weight, Float8Linear, Float8Rows, NVFP4WeightOnly,
                              quantize_, quantize_fp8_reference, quantize_fp8_rowwise, quantize_rows)
from dz_kernels.quant import api as quant_api
from dz_kernels.quant.dispatch import fp8_linear_dispatch, fp8_linear_path, fp8_rows_dispatch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_same_rows(a: Float8Rows, q: torch.Tensor, s: torch.Tensor):
    assert torch.equal(_bits(a.data).cpu(), _bits(q).cpu()) and torch.equal(a.scale.cpu(), s.cpu())


def check_fp8_bound(q, s, want64):
    """q * s within half an E4M3 step of the float64 value: 2^-4 relative for normals, 2^-10 * s below them (the
    bound takes twice that, for the float32 arithmetic of the norm)."""
    got = q.cpu().double() * s.cpu().double()
    bound = want64.abs() * 2 ** -4 + s.cpu().double() * 2 ** -9
    assert (got - want64).abs().le(bound).all()


# ------------------------------------------------------------------------------------- Float8Rows into Float8Linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_rows_in_equals_float_in_bit_for_bit(dtype, bias):
    """Float8Linear(quantize_rows(x)) == Float8Linear(x), odd sizes; both near the float64 product of the
    dequantized operands."""
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(37, 29, bias=bias).to(dtype)
    q = Float8Linear.from_linear(lin).to(DEVICE)
    x = torch.randn(3, 7, 37, generator=g).to(DEVICE, dtype)
    rows = quantize_rows(x)
    assert rows.data.shape == (3, 7, 37) and rows.scale.shape == (3, 7, 1) and rows.dtype == dtype
    want = q(x)
    got = q(rows)
    assert got.dtype == dtype and got.shape == (3, 7, 29)
    assert torch.equal(got, want)
    a = rows.data.cpu().double() * rows.scale.cpu().double()
    w = q.weight.cpu().double() * q.weight_scale.cpu().double()[:, None]
    exact = a @ w.T + (lin.bias.double() if bias else 0)
    torch.testing.assert_close(got.cpu().double(), exact, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-5)


def test_rows_are_the_rowwise_quantizer():
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    q, s = quantize_fp8_reference(x, "row")
    assert_same_rows(quantize_rows(x.to(DEVICE)), q, s)


def test_bad_rows_give_clear_errors():
    q = Float8Linear.from_linear(torch.nn.Linear(128, 16)).to(DEVICE)
    blocks = Float8Linear.from_linear(torch.nn.Linear(128, 16), block_scaled=True).to(DEVICE)
    rows = quantize_rows(torch.randn(4, 128, device=DEVICE))
    with pytest.raises(ValueError, match="block_scaled=True.*one scale per token"):
        blocks(rows)
    assert not blocks.accepts_fp8_rows(torch.randn(4, 128, device=DEVICE))
    with pytest.raises(ValueError, match=r"in_features=128\) got Float8Rows data of shape \(4, 64\)"):
        q(quantize_rows(torch.randn(4, 64, device=DEVICE)))
    with pytest.raises(ValueError, match="scale must be float32 of shape"):
        q(rows._replace(scale=rows.scale.reshape(4)))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        q(rows._replace(data=rows.data.float()))
    with pytest.raises(TypeError, match="Float8Rows.dtype"):
        q(rows._replace(dtype=torch.int32))
    with pytest.raises(TypeError, match="quantize_rows takes"):
        quantize_rows(torch.ones(3, 4, dtype=torch.int32))


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="this torch has no torch._scaled_mm")
def test_rows_dispatch_paths(fp8_table):  # noqa: F811
    """The CUDA dispatch of a Float8Rows (run here by the interpreter): "triton" and "scaled_mm" equal the float
    input's dispatch on the same path (same quantizer, same GEMM); "bf16" is the dequantized rows through the bf16
    weight. path_for reports each."""
    g = torch.Generator().manual_seed(4)
    M, K, N = 12, 64, 32
    lin = torch.nn.Linear(K, N).to(DEVICE, torch.bfloat16)
    mod = Float8Linear.from_linear(lin)
    mod._original = (lin,)
    x = torch.randn(M, K, generator=g).to(DEVICE, torch.bfloat16)
    a, sa = quantize_fp8_rowwise(x)             # the dispatch's own quantizer (Triton, also in the interpreter)
    for path in ("triton", "scaled_mm", "bf16"):
        fp8_table([({}, path)])
        assert fp8_linear_path(M, K, N, DEVICE, has_bf16_weight=True) == path
        assert mod.path_for(Float8Rows(a, sa, torch.bfloat16)) == path
        y = fp8_rows_dispatch(a, sa, mod.weight, mod.weight_scale, lin.bias, out_dtype=torch.bfloat16,
                              bf16_weight=lin.weight)
        assert y.shape == (M, N) and y.dtype == torch.bfloat16
        if path == "bf16":
            deq = (a.float() * sa).to(torch.bfloat16)
            torch.testing.assert_close(y, TF.linear(deq, lin.weight, lin.bias))
            # on CUDA the block keeps the float input where bf16 runs; a CPU module runs the reference GEMM anyway
            assert mod.accepts_fp8_rows(x) is (DEVICE.type == "cpu")
        else:
            assert torch.equal(y, fp8_linear_dispatch(x, mod.weight, mod.weight_scale, lin.bias))


# ------------------------------------------------------------------------------------------- the fused producer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_layernorm_fp8_is_the_rowwise_quantizer(dtype, residual):
    """fp8=True writes the rowwise quantizer's bits of the norm's unrounded float32 result (out= a float32 buffer
    holds it): for float32 activations that is the plain output; q * scale is within half an E4M3 step of the
    float64 reference."""
    g = torch.Generator().manual_seed(6)
    B, L, C = 2, 5, 72
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, y, gate, shift, scale = r(B, L, C), r(B, L, C), 0.5 * r(B, L, C), 0.3 * r(B, L, C), 0.3 * r(B, 1, C)
    w, b = 1 + 0.1 * r(C), 0.1 * r(C)
    dev = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    args = (dev(x), dev(shift), dev(scale), 1e-6, dev(w), dev(b))
    o = lambda t: t.to(dtype).double()  # noqa: E731  (the oracle sees the inputs the kernel reads)
    x64 = (o(x) + o(gate) * o(y)).to(dtype).double() if residual else o(x)   # x_new is rounded to x's dtype
    want64 = layernorm_modulate_reference(x64, o(shift), o(scale), 1e-6, o(w), o(b))
    with torch.no_grad():
        if residual:
            call = lambda **kw: fused.gated_residual_layernorm_modulate(  # noqa: E731
                dev(x), dev(y), dev(gate), *args[1:], **kw)[1]
        else:
            call = lambda **kw: fused.layernorm_modulate(*args, **kw)  # noqa: E731
        q, s = call(fp8=True)
        h32 = call(out=torch.empty(B, L, C, device=DEVICE))
        assert_same_rows(quantize_rows(h32), q, s)
        if dtype == torch.float32:
            assert torch.equal(call(), h32)
    check_fp8_bound(q, s, want64)


# --------------------------------------------------------------------------------------------------- the model
def quantized_tiny(ops: str, dtype=torch.float32, config=Float8DynamicActivationFloat8Weight()):
    m = tiny_model(num_layers=1, num_embodiments=1, latent_height=2, latent_width=4).to(DEVICE, dtype)
    if config is None:
        return m
    if ops == "fused":
        apply_(m, ApplyConfig(attention=False, norms=True, kv_cache=False))
    quantize_(m, config)
    return m


def record_inputs(m):
    """{name: set of input type names} of the block linears the producer may feed, and of one it must not."""
    seen, b = {}, m.blocks[0]
    mods = {"q": b.self_attn.q, "k": b.self_attn.k, "v": b.self_attn.v, "o": b.self_attn.o, "ffn0": b.ffn[0],
            "ffn2": b.ffn[2]}
    for n, mod in mods.items():
        mod.register_forward_pre_hook(lambda mod, args, _n=n: seen.setdefault(_n, set()).add(type(args[0]).__name__))
    return seen


def producer_off(m):
    m.ops = m.ops.replace(layernorm_modulate_rows=None, residual_layernorm_modulate_rows=None)


@pytest.mark.parametrize("ops", ["reference", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_actions_with_and_without_the_producer(ops, dtype, monkeypatch):
    """Two fused control steps of the FP8 per-token model: q, k, v and ffn.0 get Float8Rows (o and ffn.2 floats),
    quantized once per norm; the actions equal the producer-off model's, bit for bit, except the fused norm with
    bf16 activations, which quantizes its unrounded float32 result (one bf16 rounding fewer): there within bf16
    rounding."""
    m = quantized_tiny(ops, dtype)
    seen = record_inputs(m)
    calls = []
    real = quant_api.quantize_rows
    monkeypatch.setattr(quant_api, "quantize_rows", lambda x: calls.append(x.shape) or real(x))
    x = {k: v.to(dtype) for k, v in policy_inputs(m.cfg).items()}
    got = run_policy(m, PolicyConfig(num_steps=1, fused_control=True, negative_prompt=None), x)
    assert seen == {"q": {"Float8Rows"}, "k": {"Float8Rows"}, "v": {"Float8Rows"}, "ffn0": {"Float8Rows"},
                    "o": {"Tensor"}, "ffn2": {"Tensor"}}, seen
    n_forwards = len(calls) // 2
    assert len(calls) == (2 * n_forwards if ops == "reference" else 0) and (ops == "fused" or n_forwards > 0)
    seen.clear()
    producer_off(m)
    want = run_policy(m, PolicyConfig(num_steps=1, fused_control=True, negative_prompt=None), x)
    assert all(v == {"Tensor"} for v in seen.values()), seen
    for a, b in zip(got, want):
        assert a.dtype == dtype and torch.isfinite(a).all()
        if ops == "fused" and dtype == torch.bfloat16:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
        else:
            assert torch.equal(a, b)


def test_plain_path_when_grad_is_on_or_consumers_take_floats():
    """Training (grad on), a bf16 model with nn.Linear, and NVFP4 linears keep the plain path."""
    for m, grad in ((quantized_tiny("reference"), True), (quantized_tiny("reference", config=None), False),
                    (quantized_tiny("reference", config=NVFP4WeightOnly()), False)):
        seen = record_inputs(m)
        with torch.set_grad_enabled(grad):
            m(m.layout("train", num_chunks=1), **train_inputs(m.cfg, K=1))
        assert len(seen) == 6 and all(v == {"Tensor"} for v in seen.values()), seen


def control_step_inputs(m, dtype=torch.float32) -> dict:
    """The keyword arguments of one cached control-step forward of the tiny model (the first chunk)."""
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in train_inputs(m.cfg).items()}
    fpc, apc = m.cfg.frames_per_chunk, m.cfg.actions_per_chunk
    with torch.no_grad():
        ckv = m.context_kv(x["text"], x["clip"])
    return dict(clean=x["clean"][:, :, :1], clean_cond=x["clean_cond"][:, :, :1], noisy=x["noisy"][:, :, 1:1 + fpc],
                noisy_cond=x["noisy_cond"][:, :, 1:1 + fpc], t_video=x["t_video"][:, 1:1 + fpc],
                actions=x["actions"][:, :apc], t_action=x["t_action"][:, :apc], state=x["state"][:, :1],
                embodiment=x["embodiment"], context_kv=ckv)


@pytest.mark.parametrize("ops", ["reference", "fused"])
def test_producer_path_traces_whole(ops):
    """torch.compile(fullgraph=True, aot_eager) of a control step of the FP8 model with the producer path: no graph
    break, the eager result."""
    m = quantized_tiny(ops)
    step = control_step_inputs(m)
    seen = record_inputs(m)
    compiled = torch.compile(lambda lay, cache, kw: m(lay, cache=cache, **kw), fullgraph=True, backend="aot_eager")
    outs = []
    with torch.no_grad():
        for fn in (compiled, lambda lay, cache, kw: m(lay, cache=cache, **kw)):
            cache = m.new_cache(1)
            outs.append(fn(cache.layout("control", 1), cache, step))
    assert seen["q"] == {"Float8Rows"}
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- per-call dispatch cost
class CountingDict(dict):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def get(self, key, default=None):
        self.counter["dict"] += 1
        return super().get(key, default)


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="this torch has no torch._scaled_mm")
@pytest.mark.parametrize("ops", ["reference", "fused"])
def test_block_forward_resolves_each_linear_path_once(ops, fp8_table, monkeypatch):  # noqa: F811
    """The eager CUDA dispatch of the FP8 producer path (run here through the Triton interpreter and CPU
    torch._scaled_mm): a control-step forward asks the block's 8 FP8 linears it runs for their paths 12 times in all
    (the producer's accepts_fp8_rows for q, k, v and ffn.0, then each forward), which were 12 table lookups; now the
    first forward at a shape resolves 8 (one per linear, at most one dictionary lookup each) and the next none. A
    table change is seen at once. The output equals the uncached dispatch's, bit for bit."""
    fp8_table([({}, "scaled_mm")])
    monkeypatch.setattr(quant_api, "_runs_dispatch", lambda t: True)
    m = quantized_tiny(ops, torch.bfloat16)
    b = m.blocks[0]
    lins = [b.self_attn.q, b.self_attn.k, b.self_attn.v, b.self_attn.o, b.cross_attn.q, b.cross_attn.o, b.ffn[0],
            b.ffn[2]]            # what a forward runs (the cross-attention's k/v come from context_kv, before)
    assert all(isinstance(lin, Float8Linear) for lin in lins)
    n = {"calls": 0, "resolved": 0, "dict": 0}
    real_path, real_resolve = Float8Linear._path, quant_api.fp8_linear_path

    def counted_path(self, t, out_dtype):
        n["calls"] += 1
        return real_path(self, t, out_dtype)

    def counted_resolve(*a, **k):
        n["resolved"] += 1
        return real_resolve(*a, **k)
    monkeypatch.setattr(Float8Linear, "_path", counted_path)
    monkeypatch.setattr(quant_api, "fp8_linear_path", counted_resolve)
    for lin in lins:
        lin._paths.paths = CountingDict(n)
    seen = record_inputs(m)
    step = control_step_inputs(m, torch.bfloat16)

    def forward():
        for k in n:
            n[k] = 0
        cache = m.new_cache(1)
        with torch.no_grad():
            out = m(cache.layout("control", 1), cache=cache, **step)
        return out, dict(n)

    first, counts = forward()
    assert seen["q"] == {"Float8Rows"} and seen["ffn0"] == {"Float8Rows"} and seen["o"] == {"Tensor"}
    assert counts == {"calls": 12, "resolved": 8, "dict": 8}, counts
    again, counts = forward()
    assert counts == {"calls": 12, "resolved": 0, "dict": 0}, counts
    for a, b in zip(first, again):
        assert torch.equal(a, b)

    # the uncached dispatch (a table lookup per call, as before) computes the same bits
    monkeypatch.setattr(Float8Linear, "_path", lambda self, t, dt: real_resolve(
        t.numel() // self.in_features, self.in_features, self.out_features, t.device,
        block_scaled=self.block_scaled, has_bf16_weight=self._bf16_weight(t) is not None, out_dtype=dt))
    uncached, _ = forward()
    for a, b in zip(first, uncached):
        assert torch.equal(a, b)

    # a table change reaches the modules at once: "bf16" where the original weight is kept turns the producer off
    monkeypatch.setattr(Float8Linear, "_path", counted_path)
    fp8_table([({}, "bf16")])
    seen.clear()
    forward()
    assert seen["q"] == {"Tensor"} and seen["ffn0"] == {"Tensor"}
    assert {lin.path_for(torch.ones(5, lin.in_features, dtype=torch.bfloat16)) for lin in lins} == {"bf16"}


# ------------------------------------------------------------------------------------------------------- the bench
@pytest.mark.parametrize("small", [True, False])
def test_qkv_producer_bench_cases(small):
    """bench quant lists the norm + q/k/v case at the Wan shapes (C 5120, M 1785 and 3570) with its peers."""
    from dz_bench import harness

    harness.load_cases()
    cases = [c for c in harness.registry()["quant"](harness.BenchContext(device="cpu", small=small))
             if c.case.startswith("fp8-qkv-producer/")]
    want = {(16, 128)} if small else {(1785, 5120), (3570, 5120)}
    assert {(c.params["M"], c.params["K"]) for c in cases} == want
    for c in cases:
        assert set(c.impls) == {"dz", "dz-fp8-separate", "bf16-cublas", "bf16-compile"}


def test_qkv_producer_bench_impls_compute_the_chain():
    """The small case's impls (no compile peer: slow here) run and pass their check: the FP8 chains within FP8
    error of the float32 chain, the producer path taken and within one FP8 rounding of the separate one."""
    from dz_bench import harness

    harness.load_cases()
    ctx = harness.BenchContext(device=DEVICE.type, small=True)
    case = next(c for c in harness.registry()["quant"](ctx) if c.case.startswith("fp8-qkv-producer/"))
    outs = {name: case.impls[name]()() for name in ("dz", "dz-fp8-separate", "bf16-cublas")}
    assert case.params["path"].startswith("producer: fused norm FP8 epilogue")
    errs = {name: case.check(out) for name, out in outs.items()}
    assert errs["bf16-cublas"] < 0.05 and errs["dz"] < 0.4 and errs["dz-fp8-separate"] < 0.4, errs
    for a, b in zip(outs["dz"], outs["dz-fp8-separate"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.15, atol=0.15)
