"""Layout attention on a GPU (skipped on a CPU, with the reason): the DROID-size layouts against float64 with the
precision bar, the dense dispatch, CUDA graphs and torch.compile (inductor). Layouts, inputs and the bar:
tests/attention_cases.py."""
import pytest
import torch
from conftest import requires_cuda

from attention_cases import LAYOUTS, bar_atol, make_qkv, torch_lowp
from dreamzero.attention import attention_dense_reference
from dreamzero.config import get_config
from dreamzero.layout import inference_layout, layout_for_config
from dz_kernels.attention import layout_attention
from dz_kernels.testing import assert_within_lowp_bar


def _gpu_check(layout, B, H, deterministic):
    q, k, v = (t.cuda() for t in make_qkv(layout, B, H, 128, torch.bfloat16))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(torch.bfloat16)
    mask = layout.dense_mask("cuda")
    out = layout_attention(q, k, v, layout, None, deterministic, dense_sdpa=False)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_dense_reference(q64, k64, v64, mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    del q64, k64, v64
    low = torch_lowp(q, k, v, mask)
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    assert_within_lowp_bar(out, ref, low, atol=bar_atol(ref, torch.bfloat16), name="out")
    for name, got, want, base in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_within_lowp_bar(got, want, base, atol=bar_atol(want, torch.bfloat16), name=name)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_droid_training_layout(deterministic):
    _gpu_check(layout_for_config(get_config("droid-14b"), "train"), 1, 1, deterministic)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_gpu_small_layouts(name):
    _gpu_check(LAYOUTS[name](), 2, 3, False)


@requires_cuda
@pytest.mark.gpu
def test_gpu_control_step_and_dense_dispatch():
    cfg = get_config("droid-14b")
    _gpu_check(layout_for_config(cfg, "control", chunk=5, cached_frames=tuple(range(7))), 2, 2, False)
    den = layout_for_config(cfg, "denoise", chunk=5, cached_frames=tuple(range(9)))
    q, k, v = (t.cuda() for t in make_qkv(den, 2, 4, 128, torch.bfloat16))
    a = layout_attention(q, k, v, den)                        # dispatched to SDPA (dense)
    b = layout_attention(q, k, v, den, dense_sdpa=False)      # the Triton kernel
    ref = attention_dense_reference(q, k, v, den.dense_mask("cuda"))
    low = torch_lowp(q, k, v, den.dense_mask("cuda"))
    for got in (a, b):
        assert_within_lowp_bar(got, ref, low, atol=bar_atol(ref, torch.bfloat16))


@requires_cuda
@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    """Forward + backward captured in a CUDA graph (after a warm-up that builds the schedule and compiles the
    kernels) and under torch.compile(fullgraph=True) give the eager results."""
    lay = LAYOUTS["train-7-a24"]()
    q, k, v = (t.cuda().requires_grad_() for t in make_qkv(lay, 2, 4, 128, torch.bfloat16))
    dout = torch.randn(q.shape, device="cuda").to(torch.bfloat16)

    def step():
        out = layout_attention(q, k, v, lay, None, True)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    # detached: a live autograd graph from the default stream would keep q/k/v's AccumulateGrad nodes on that stream,
    # and the captured backward would then have to sync with it (cudaErrorStreamCaptureImplicit)
    want = tuple(t.detach() for t in step())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    static = tuple(t.detach() for t in static)
    for t in static:
        t.fill_(float("nan"))                # the replay must write every output
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, want):
        assert torch.equal(a, b)

    cf = torch.compile(lambda q, k, v: layout_attention(q, k, v, lay, None, True), fullgraph=True)
    out = cf(q, k, v)
    got = (out,) + torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.gpu
def test_gpu_compile_with_the_dense_dispatch_and_cuda_graphs():
    """torch.compile (inductor, mode reduce-overhead: CUDA graphs) of the public function on a dense layout (the
    SDPA dispatch reads the pattern as constants) and on the control step (two SDPA blocks), eager results."""
    den = inference_layout(5, 2, 3, 1, "denoise", 2, (0, 1, 2), -1, "release")
    ctl = LAYOUTS["control-7"]()
    for lay, kw in ((den, {}), (ctl, dict(sdpa_blocks=2))):
        q, k, v = (t.cuda() for t in make_qkv(lay, 1, 2, 64, torch.bfloat16))
        want = layout_attention(q, k, v, lay, **kw)
        cf = torch.compile(lambda q, k, v: layout_attention(q, k, v, lay, **kw), fullgraph=True,
                           mode="reduce-overhead")
        for _ in range(3):                   # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            got = cf(q, k, v).clone()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
