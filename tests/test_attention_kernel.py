"""Layout attention kernels (Triton; the interpreter on a CPU) against the float64 reference
(dz_kernels.attention.reference): forward, log-sum-exp, dq/dk/dv, odd sizes (1-token state blocks, 24-token action
blocks, lengths that are not multiples of the tile, binding windows, cached frames nobody sees), queries that see
nothing, strided inputs, the deterministic backward. Layouts, inputs and the precision bar: tests/attention_cases.py.
Non-finite inputs: test_attention_nonfinite.py; the ops, dispatch, compile and bad input: test_attention_op.py; the
GPU-only checks: test_attention_gpu.py."""
import pytest
import torch
from conftest import DEVICE

from attention_cases import (LAYOUTS, SMALL, WIDE, bar_atol, check_backward, check_forward, leaves64, make_qkv,
                             torch_lowp)
from dreamzero.attention import attention_blockwise
from dz_kernels.attention import AttentionPattern, layout_attention, layout_attention_reference
from dz_kernels.attention.ops import layout_attention_op
from dz_kernels.testing import assert_within_lowp_bar


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_forward_bf16(name):
    check_forward(LAYOUTS[name](), 2, 1, 16, torch.bfloat16, SMALL)


@pytest.mark.parametrize("D,dtype,config", [(32, torch.float16, WIDE), (64, torch.bfloat16, SMALL),
                                            (128, torch.float16, None), (16, torch.float32, SMALL)])
def test_forward_head_dims_dtypes(D, dtype, config):
    check_forward(LAYOUTS["train-5-w3"](), 1, 2, D, dtype, config, scale=0.3)


def test_forward_lse_matches_reference():
    lay = LAYOUTS["control-7"]()
    q, k, v = make_qkv(lay, 1, 2, 32, torch.bfloat16)
    cfg = SMALL.as_list()
    out, lse = layout_attention_op(q, k, v, lay.attention_pattern().key, 0.2, cfg, False)
    assert lse.shape == (1, 2, lay.q_len) and lse.dtype == torch.float32
    ref = layout_attention_reference(*leaves64(q, k, v), lay, 0.2, return_lse=True)[1].detach()
    torch.testing.assert_close(lse.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["train-5-w3", "denoise-w3", "control-7", "train-13-w2"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_bf16(name, deterministic):
    check_backward(LAYOUTS[name](), 1, 1, 16, torch.bfloat16, SMALL, deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
def test_bit_windows_capped_at_the_words_of_the_table(deterministic):
    """42 one-token segments: two bit words per row, fewer than the three windows a 64-wide tile spans, so the
    launchers load two (schedule.nwin caps the windows at the table's words); the forward, both backward passes and
    the dk/dv kernel's key-major table still give the reference."""
    from dreamzero.layout import train_layout
    from dz_kernels.attention.schedule import nwin, token_tables

    lay = train_layout(1, 1, 1, 1, 10, 7)
    words = token_tables(lay)
    assert words.qk_bits.shape[1] == words.kq_bits.shape[1] == 2 and nwin(64, 2) == 2 < nwin(64)
    check_backward(lay, 1, 2, 16, torch.float32, WIDE, deterministic)


def test_backward_fp16_wide_tiles_head_dim_64():
    check_backward(LAYOUTS["train-7-a24"](), 1, 2, 64, torch.float16, WIDE, True, scale=0.2)


def test_backward_fp32_default_tiles():
    check_backward(LAYOUTS["control-7"](), 2, 1, 32, torch.float32, None, False)


def test_keys_nobody_sees_get_zero_gradients():
    lay = LAYOUTS["denoise-w3"]()
    mask = lay.dense_mask()
    unseen = ~mask.any(dim=0)
    assert unseen.sum() >= 10, "frames 1 and 2 are out of every query's window"
    dk, dv = check_backward(lay, 1, 1, 16, torch.bfloat16, SMALL, True)[1:]
    assert (dk[:, unseen] == 0).all() and (dv[:, unseen] == 0).all()


def test_deterministic_backward_is_bitwise_reproducible():
    lay = LAYOUTS["train-5-w3"]()
    runs = []
    for _ in range(2):
        q, k, v = make_qkv(lay, 1, 1, 16, torch.bfloat16, requires_grad=True)
        out = layout_attention(q, k, v, lay, None, True, config=SMALL)
        runs.append((out,) + torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [True, False])
def test_lse_gradient(deterministic):
    """The op's second output (lse) is differentiable too: d lse_i / d s_ij = p_ij enters through delta."""
    lay = LAYOUTS["train-5-w3"]()
    q, k, v = make_qkv(lay, 1, 1, 16, torch.float32, requires_grad=True)
    cfg = SMALL.as_list()
    g = torch.Generator().manual_seed(3)
    w_out = torch.randn(1, lay.q_len, 1, 16, generator=g)
    w_lse = torch.randn(1, 1, lay.q_len, generator=g)
    out, lse = layout_attention_op(q, k, v, lay.attention_pattern().key, 0.25, cfg, deterministic)
    loss = (out * w_out.to(q.device)).sum() + (lse * w_lse.to(q.device)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = leaves64(q, k, v)
    ref, ref_lse = layout_attention_reference(q64, k64, v64, lay, 0.25, return_lse=True)
    ref_grads = torch.autograd.grad((ref * w_out.double()).sum() + (ref_lse * w_lse.double()).sum(),
                                    (q64, k64, v64))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)


def test_rows_that_see_nothing_are_safe():
    """No DreamZero layout has a query that sees nothing (every token sees itself), but a pattern may, and the
    kernels must not make NaN of one: out 0, lse -inf, zero gradients. Query segment 1 sees nothing while its
    neighbours see keys of the same tiles (partial tiles with fully masked rows); the last pattern sees nothing
    at all (every tile skipped)."""
    lengths = (5, 7, 3, 6)
    for rows in ((0b0001, 0b0000, 0b0111, 0b1011), (0, 0, 0, 0)):
        pat = AttentionPattern(lengths, lengths, rows)
        blind = pat.dense_mask().any(dim=1).logical_not()
        q, k, v = make_qkv(pat, 1, 2, 16, torch.bfloat16, requires_grad=True)
        for det in (True, False):
            out, lse = layout_attention_op(q, k, v, pat.key, 0.25, SMALL.as_list(), det)
            loss = out.float().sum() + lse.masked_fill(blind.to(q.device), 0.0).sum()
            grads = torch.autograd.grad(loss, (q, k, v))
            out, lse = out.cpu(), lse.cpu()
            assert (out[:, blind] == 0).all() and (lse[:, :, blind] == float("-inf")).all()
            assert torch.isfinite(out).all()
            ref = attention_blockwise(*leaves64(q, k, v), pat, 0.25)
            torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-2, atol=2e-2)
            dq = grads[0].cpu()
            assert (dq[:, blind] == 0).all() and all(torch.isfinite(g).all() for g in grads)
            unseen = ~pat.dense_mask().any(dim=0)
            for g in grads[1:]:
                assert (g.cpu()[:, unseen] == 0).all()


def test_strided_inputs():
    """q, k, v as views of a packed [B, L, 3, H, D] projection (strided tokens and heads), and a last dim that is
    not contiguous (copied by the public function, as documented)."""
    lay = LAYOUTS["train-5-w3"]()            # training: keys = queries, so one packed projection holds q, k, v
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, lay.q_len, 3, 2, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = layout_attention(q, k, v, lay, config=SMALL)
    ref = layout_attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), lay)
    low = torch_lowp(q, k, v, lay.dense_mask(DEVICE)).cpu()
    assert_within_lowp_bar(out.cpu(), ref, low, atol=bar_atol(ref, torch.bfloat16))
    kt = k.transpose(-1, -2).contiguous().transpose(-1, -2)      # same values, last-dim stride != 1
    assert kt.stride(-1) != 1
    out2 = layout_attention(q, kt, v, lay, config=SMALL)
    assert torch.equal(out, out2)


def test_matches_release_loop_reference():
    """The kernel and the release-style per-block loop agree (float32, tight)."""
    lay = LAYOUTS["control-7"]()
    q, k, v = make_qkv(lay, 1, 2, 16, torch.float32)
    out = layout_attention(q, k, v, lay, config=SMALL)
    torch.testing.assert_close(out, attention_blockwise(q, k, v, lay), rtol=1e-5, atol=1e-5)
