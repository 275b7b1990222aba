"""NaN and inf in the keys, values or output gradient of layout attention: they reach exactly the queries (and
gradients) that see them, as in the release's per-block loop (float64, only the visible keys gathered), in the
forward, both backward schedules and the dense-block SDPA dispatch. Layouts and inputs: tests/attention_cases.py."""
import pytest
import torch

from attention_cases import LAYOUTS, SMALL, leaves64, make_qkv
from dreamzero.attention import attention_blockwise
from dz_kernels.attention import layout_attention


def nonfinite_rows(t: torch.Tensor) -> torch.Tensor:
    """bool [B, L, H]: the (token, head) rows holding a NaN or an inf."""
    return ~torch.isfinite(t.detach().cpu()).all(dim=-1)


def check_nonfinite(lay, which: str, deterministic: bool, **kw):
    """NaN / inf planted in some rows of `which` (k, v or dout): the output and gradients of the kernel are
    non-finite in exactly the (token, head) rows where the release's per-block loop (float64, only visible keys
    gathered) has them, and equal to it elsewhere."""
    q, k, v = make_qkv(lay, 1, 2, 16, torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    mask = lay.dense_mask()
    seen_by = mask.sum(dim=0)
    # a key that some queries see and others do not, and (if the layout has one) a key nobody sees
    partial = [int(j) for j in torch.nonzero((seen_by > 0) & (seen_by < lay.q_len)).flatten()[::7][:3]]
    nobody = [int(j) for j in torch.nonzero(seen_by == 0).flatten()[:2]]
    rows = partial + nobody
    if which == "dout":
        rows = [int(i) for i in torch.nonzero(~mask[:, partial[0]]).flatten()[:2]]
        rows += [int(torch.nonzero(mask[:, partial[0]]).flatten()[0])]
    bad = {"k": k, "v": v, "dout": dout}[which].detach()
    bad_cpu = bad.cpu()
    bad_cpu[:, rows[0], :, 3] = float("nan")
    bad_cpu[:, rows[1:], :, 5] = float("inf")
    bad.copy_(bad_cpu.to(bad.device))
    dout = dout.to(q.device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = layout_attention(q, k, v, lay, None, deterministic, config=SMALL, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = leaves64(q, k, v)
    ref = attention_blockwise(q64, k64, v64, lay)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads):
        got_bad, want_bad = nonfinite_rows(got), nonfinite_rows(want)
        assert torch.equal(got_bad, want_bad), (
            f"{name}: non-finite rows {torch.nonzero(got_bad).tolist()}, the reference has "
            f"{torch.nonzero(want_bad).tolist()}")
        ok = ~want_bad
        torch.testing.assert_close(got.detach().cpu().double()[ok], want.detach()[ok], rtol=1e-4, atol=1e-5,
                                   msg=name)
    assert nonfinite_rows(out).any() or which == "dout", "the planted values must reach some query"


@pytest.mark.parametrize("which", ["v", "k", "dout"])
@pytest.mark.parametrize("name", ["denoise-w3", "train-5-w3"])
def test_nonfinite_values_reach_only_the_queries_that_see_them(name, which):
    """NaN/inf in V or K at keys some queries cannot see (and keys nobody sees, from the cache), NaN in dO: masked
    probabilities never multiply them, in the forward and in both backward schedules."""
    check_nonfinite(LAYOUTS[name](), which, deterministic=True)
    if which != "dout":
        check_nonfinite(LAYOUTS[name](), which, deterministic=False)


def test_nonfinite_values_in_the_dense_block_dispatch():
    """The SDPA dispatch of the control step (one call per dense block on views of k and v) is as clean."""
    check_nonfinite(LAYOUTS["control-7"](), "v", deterministic=False, dense_sdpa=True, sdpa_blocks=2)
