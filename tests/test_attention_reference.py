"""The plain-PyTorch reference of layout attention (dz_kernels.attention.reference): what the op computes, held
against the model's two oracles (the dense mask and the release's per-block loop), its log-sum-exp, its dtypes,
queries that see nothing, non-finite values at keys a query does not see, and bad shapes."""
import pytest
import torch

from attention_cases import LAYOUTS, make_qkv
from dreamzero.attention import attention_blockwise, attention_dense_reference
from dz_kernels.attention import AttentionPattern, layout_attention_reference


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reference_matches_the_models_oracles(name):
    lay = LAYOUTS[name]()
    q, k, v = make_qkv(lay, 2, 2, 16, torch.float64, device="cpu")
    out, lse = layout_attention_reference(q, k, v, lay, 0.3, return_lse=True)
    assert out.dtype == torch.float64 and lse.shape == (2, 2, lay.q_len)
    mask = lay.dense_mask()
    torch.testing.assert_close(out, attention_dense_reference(q, k, v, mask, 0.3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, attention_blockwise(q, k, v, lay, 0.3), rtol=1e-12, atol=1e-12)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    want = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)
    # the default scale is D ** -0.5, the pattern itself serves as the layout
    torch.testing.assert_close(layout_attention_reference(q, k, v, lay.attention_pattern()),
                               attention_dense_reference(q, k, v, mask), rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_compute_in_float32_and_return_their_dtype():
    lay = LAYOUTS["control-7"]()
    q, k, v = make_qkv(lay, 1, 2, 32, torch.bfloat16, device="cpu")
    out, lse = layout_attention_reference(q, k, v, lay, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want = layout_attention_reference(q.float(), k.float(), v.float(), lay)
    assert torch.equal(out, want.to(torch.bfloat16))


def test_queries_that_see_nothing_get_zero_and_minus_inf():
    lengths = (5, 7, 3)
    pat = AttentionPattern(lengths, lengths, (0b001, 0b000, 0b111))
    q, k, v = make_qkv(pat, 1, 2, 16, torch.float64, requires_grad=True, device="cpu")
    out, lse = layout_attention_reference(q, k, v, pat, return_lse=True)
    assert (out[:, 5:12] == 0).all() and (lse[:, :, 5:12] == float("-inf")).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 12:]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads) and (grads[0][:, 5:12] == 0).all()


def test_nonfinite_values_reach_only_the_queries_that_see_them():
    lengths = (4, 4, 4)
    pat = AttentionPattern(lengths, lengths, (0b001, 0b011, 0b111))
    q, k, v = make_qkv(pat, 1, 1, 16, torch.float32, device="cpu")
    v[:, 9, :, 2] = float("nan")                 # key segment 2: only query segment 2 sees it
    k[:, 5, :, 0] = float("nan")                 # key segment 1: query segments 1 and 2 see it
    out = layout_attention_reference(q, k, v, pat)
    assert torch.isfinite(out[:, :4]).all()
    assert not torch.isfinite(out[:, 4:]).all(dim=-1).any()


def test_bad_shapes_are_named():
    lay = LAYOUTS["train-5-w3"]()
    q, k, v = make_qkv(lay, 1, 1, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        layout_attention_reference(q[0], k, v, lay)
    with pytest.raises(ValueError, match="query and .* key tokens"):
        layout_attention_reference(q[:, 1:], k, v, lay)
    with pytest.raises(TypeError, match="attention_pattern"):
        layout_attention_reference(q, k, v, "train")
