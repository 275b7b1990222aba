"""The train_step bench's pieces (the benches' FlexAttention adapter, its cases) and the trainer's GPU paths: bf16
training, and the fused attention (dz_kernels.apply_) converging like the reference ops. GPU tests skip on a CPU."""
import warnings

import pytest
import torch
from conftest import DEVICE, requires_cuda

from dreamzero.attention import attention_dense_reference
from dreamzero.config import get_config
from dreamzero.layout import layout_for_config


def _flex_module():
    from dz_bench.cases import _flex
    return _flex


@pytest.mark.parametrize("K", [1, 3])
def test_flex_adapter_applies_the_layout_mask(K):
    """Forward only (torch has no FlexAttention backward on a CPU), on the suite's device: the adapter's BlockMask
    equals the layout's rule, checked against a float64 dense reference on the CPU."""
    cfg = get_config("tiny")
    lay = layout_for_config(cfg, "train", num_chunks=K)
    fn = _flex_module().flex_attention_for(lay, DEVICE)
    g = torch.Generator().manual_seed(K)
    q, k, v = (torch.randn(2, lay.q_len, 4, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # eager flex warns that it is unfused
        out = fn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lay)
    ref = attention_dense_reference(q, k, v, lay.dense_mask())
    assert (out.cpu().double() - ref).abs().max().item() < 1e-5
    other = layout_for_config(cfg, "train", num_chunks=K + 1)
    with pytest.raises(ValueError, match="another layout"):
        fn(q, k, v, other)


def test_bench_case_lists_cheaply():
    from dz_bench.cases import train_step as ts
    from dz_bench.harness import BenchContext
    cases = list(ts.cases(BenchContext(device="cpu", small=True)))
    assert len(cases) == 1
    c = cases[0]
    assert set(c.impls) == {"dz", "release-loop", "flex"}
    assert c.params["tokens"] == layout_for_config(get_config("tiny"), "train", num_chunks=3).q_len
    assert c.flops > 0


@requires_cuda
def test_flex_adapter_gradients_on_cuda():
    cfg = get_config("tiny")
    lay = layout_for_config(cfg, "train", num_chunks=2)
    fn = _flex_module().flex_attention_for(lay, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(2, lay.q_len, 4, 16, device="cuda", generator=g, requires_grad=True) for _ in range(3)]
    out = fn(*qkv, lay)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, qkv, dout)
    ref_in = [t.detach().double().requires_grad_() for t in qkv]
    ref = attention_dense_reference(*ref_in, lay.dense_mask("cuda"))
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    assert (out.double() - ref).abs().max().item() < 1e-4
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max().item() < 1e-3


def _tiny_run(tmp_path, name, **kw):
    from dreamzero.train.data import DataConfig
    from dreamzero.train.prepare import encoders_from_module, prepare_dataset
    from dreamzero.train.synthetic import make_synthetic_dataset
    from dreamzero.train.trainer import TrainConfig, Trainer, resolve_model_config

    cfg = resolve_model_config("tiny-synthetic")
    prep = tmp_path / "prep"
    if not (prep / "prepared.json").exists():
        raw = make_synthetic_dataset(str(tmp_path / "raw"), num_episodes=2, length=60)
        prepare_dataset(raw, cfg, encoders_from_module(cfg, "tiny"), DataConfig.for_model(cfg, num_chunks=2),
                        out=str(prep), dtype=torch.float32)
    tc = TrainConfig(data=[str(prep)], out_dir=str(tmp_path / name), model="tiny-synthetic", steps=8, batch_size=2,
                     lr=3e-3, save_every=1000, progress=False, tensorboard=False, device="cuda", **kw)
    return Trainer(tc)


@requires_cuda
def test_trainer_bf16_on_cuda(tmp_path):
    tr = _tiny_run(tmp_path, "bf16", precision="bf16", gradient_checkpointing=True, noise="base")
    before = tr.eval_loss([0, 1, 2])
    ms = tr.train()
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in ms)
    assert tr.eval_loss([0, 1, 2])["loss"] < before["loss"]


@requires_cuda
def test_fused_ops_converge_like_the_reference(tmp_path):
    """The convergence check of the fast ops: the same tiny model trained with the reference ops and with
    dz_kernels.apply_ (fused layout attention forward/backward and fused norms) follows the same losses (fp32)."""
    pytest.importorskip("triton")
    ref = [m["loss"] for m in _tiny_run(tmp_path, "ref", precision="fp32", noise="flash").train()]
    dz = [m["loss"] for m in _tiny_run(tmp_path, "dz", precision="fp32", noise="flash", ops="dz").train()]
    for a, b in zip(ref, dz):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a))
