"""apply_ on diffusers' WanTransformer3DModel: the fused block forward and q/k-norm attention processor give diffusers'
outputs and gradients, and undo restores diffusers' own classes and processor objects exactly.

Tiny random models (2 heads of 16, ffn 64, 2 layers, text_dim 24, freq_dim 32, patch (1, 2, 2)): text-to-video and
image-to-video (image_dim + added_kv_proj_dim), with per-sample timesteps (temb [B, 6, C]) and per-token timesteps
(temb [B, L, 6, C]). Models and inputs live on the device of tests/conftest.py (CUDA when present, else the CPU with
the Triton interpreter).
"""
import pytest
import torch
from conftest import DEVICE

pytest.importorskip("diffusers", reason="the diffusers Wan integration needs diffusers (the 'encoders' extra)")

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformerBlock  # noqa: E402

from dz_kernels import ApplyConfig, apply_, fused  # noqa: E402
from dz_kernels.diffusers_wan import (FusedWanAttnProcessor, apply_to_wan, default_quant_filter,  # noqa: E402
                                      fused_wan_block_forward)
from dz_kernels.testing import assert_within_lowp_bar, sqnr_db  # noqa: E402

FRAMES, HEIGHT, WIDTH = 3, 4, 6            # latent video: 3 frames of 4x6 -> 3 * 2 * 3 = 18 tokens
TOKENS = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
TEXT_DIM, IMAGE_DIM, IMAGE_TOKENS = 24, 20, 5
NORMS = ApplyConfig(attention=True, norms=True, kv_cache=False)


def tiny_wan(i2v: bool = False, seed: int = 0, cross_attn_norm: bool = True) -> WanTransformer3DModel:
    kw = dict(in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=32) if i2v else dict(in_channels=16)
    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, out_channels=16,
                              text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
                              cross_attn_norm=cross_attn_norm, **kw)
    with torch.no_grad():  # move every weight off its init (norm weights off 1, biases off 0)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(DEVICE)


def wan_inputs(i2v: bool = False, per_token: bool = False, B: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    # I2V: diffusers' processor takes the last 512 context tokens as text (hard-coded), the rest as image tokens
    text_len = 512 if i2v else 7
    x = dict(hidden_states=torch.randn(B, 36 if i2v else 16, FRAMES, HEIGHT, WIDTH, generator=g),
             timestep=(torch.rand(B, TOKENS, generator=g) if per_token else torch.rand(B, generator=g)) * 1000,
             encoder_hidden_states=torch.randn(B, text_len, TEXT_DIM, generator=g))
    if i2v:
        x["encoder_hidden_states_image"] = torch.randn(B, IMAGE_TOKENS, IMAGE_DIM, generator=g)
    return {k: v.to(DEVICE) for k, v in x.items()}


def run(m, x):
    return m(**x, return_dict=False)[0]


def originals(m):
    return [(type(b), b.attn1.processor, b.attn2.processor) for b in m.blocks]


def assert_restored(m, before):
    for b, (cls, p1, p2) in zip(m.blocks, before):
        assert type(b) is cls is WanTransformerBlock
        assert "forward" not in vars(b)
        assert b.forward.__func__ is WanTransformerBlock.forward
        assert b.attn1.processor is p1 and b.attn2.processor is p2
        assert type(p1) is WanAttnProcessor and type(p2) is WanAttnProcessor


@pytest.mark.parametrize("per_token", [False, True], ids=["temb_per_sample", "temb_per_token"])
def test_t2v_same_outputs_and_undo(per_token):
    m = tiny_wan()
    x = wan_inputs(per_token=per_token, B=2)
    before = originals(m)
    with torch.no_grad():
        y0 = run(m, x)
        handle = apply_(m, NORMS)
        y1 = run(m, x)
        handle.undo()
        y2 = run(m, x)
    assert y0.shape == (2, 16, FRAMES, HEIGHT, WIDTH)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)
    assert torch.equal(y2, y0)
    assert_restored(m, before)


def test_i2v_same_outputs_and_undo():
    m = tiny_wan(i2v=True)
    x = wan_inputs(i2v=True)
    before = originals(m)
    with torch.no_grad():
        y0 = run(m, x)
        handle = apply_(m, NORMS)
        y1 = run(m, x)
        handle.undo()
        y2 = run(m, x)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)
    assert torch.equal(y2, y0)
    assert_restored(m, before)


def test_without_cross_attn_norm():
    """cross_attn_norm=False: norm2 is an identity, the first residual is a plain gated_residual."""
    m = tiny_wan(cross_attn_norm=False)
    assert isinstance(m.blocks[0].norm2, torch.nn.Identity)
    x = wan_inputs()
    with torch.no_grad():
        y0 = run(m, x)
        handle = apply_(m, NORMS)
        y1 = run(m, x)
        handle.undo()
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)


def test_every_fused_op_runs(monkeypatch):
    """The swapped block and processor reach each fused op the expected number of times (no silent fallback)."""
    calls = {}
    for name in ("layernorm_modulate", "gated_residual_layernorm_modulate", "gated_residual", "rms_norm",
                 "gelu_tanh"):
        op = getattr(fused, name)

        def counted(*a, _op=op, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _op(*a, **k)
        monkeypatch.setattr(fused, name, counted)
    m = tiny_wan(i2v=True)
    handle = apply_(m, NORMS)
    with torch.no_grad():
        run(m, wan_inputs(i2v=True))
    handle.undo()
    n = len(m.blocks)
    # per block: norm1; residual + norm2; residual + norm3; the final gated residual; GELU; q/k norms of attn1 and
    # attn2 and the I2V image-key norm
    assert calls == {"layernorm_modulate": n, "gated_residual_layernorm_modulate": 2 * n, "gated_residual": n,
                     "gelu_tanh": n, "rms_norm": 5 * n}


def test_gradients_match_reference():
    m = tiny_wan()
    x = wan_inputs(per_token=True)
    x["hidden_states"].requires_grad_(True)

    def grads():
        m.zero_grad()
        x["hidden_states"].grad = None
        run(m, x).square().mean().backward()
        g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        g["input"] = x["hidden_states"].grad.clone()
        return g

    g0 = grads()
    handle = apply_(m, NORMS)
    g1 = grads()
    handle.undo()
    assert g0.keys() == g1.keys()
    # the fused ops are differentiable in everything diffusers' chain is: norm2 affine, modulation table, q/k norms
    assert any("norm2.weight" in n for n in g1) and any("scale_shift_table" in n for n in g1)
    assert any("norm_q.weight" in n for n in g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-5, msg=n)


def to_bf16_keeping_fp32_modules(m):
    """bfloat16, except the modules diffusers keeps in float32 (from_pretrained(torch_dtype=bfloat16) does this):
    rope, time_embedder, scale_shift_table, norm1/2/3."""
    m.to(torch.bfloat16)
    keep = set(m._keep_in_fp32_modules)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if keep & set(name.split(".")):
                t.data = t.data.float()
    return m


def test_bf16_within_the_low_precision_bar():
    """bfloat16 activations and weights, float32 norms and modulation table (diffusers' mixed layout): the fused
    block's error against the float32 model is within 2x diffusers' own bfloat16 error (+ 1e-3)."""
    m = tiny_wan()
    x = wan_inputs()
    with torch.no_grad():
        ref32 = run(m, x)
        to_bf16_keeping_fp32_modules(m)
        assert m.blocks[0].norm2.weight.dtype == torch.float32 and m.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
        xb = {k: (v.to(torch.bfloat16) if k != "timestep" else v) for k, v in x.items()}
        base = run(m, xb)
        handle = apply_(m, NORMS)
        got = run(m, xb)
        handle.undo()
    assert got.dtype == torch.bfloat16
    assert_within_lowp_bar(got, ref32, base, factor=2.0, atol=1e-3, name="wan bf16 output")


def test_undo_restores_objects_and_shares_backend():
    m = tiny_wan()
    before = originals(m)
    handle = apply_(m, NORMS)
    for b, (cls, p1, p2) in zip(m.blocks, before):
        assert type(b) is not cls and isinstance(b, WanTransformerBlock)
        assert type(b).__name__ == "WanTransformerBlock"        # diffusers' name-based lookups still match
        assert type(b).forward is fused_wan_block_forward
        assert isinstance(b.attn1.processor, FusedWanAttnProcessor) and b.attn1.processor._base is p1
        assert isinstance(b.attn2.processor, FusedWanAttnProcessor) and b.attn2.processor._base is p2
    # a backend chosen while applied is the one the original processor keeps
    m.blocks[0].attn1.set_attention_backend("native")
    assert before[0][1]._attention_backend == "native"
    handle.undo()
    handle.undo()  # idempotent
    assert_restored(m, before)
    assert m.blocks[0].attn1.processor._attention_backend == "native"


def test_norms_off_changes_nothing():
    m = tiny_wan()
    before = originals(m)
    handle = apply_(m, ApplyConfig(attention=True, norms=False, kv_cache=False))
    assert_restored(m, before)
    handle.undo()
    assert_restored(m, before)


def test_refuses_what_it_cannot_swap_and_changes_nothing():
    m = tiny_wan()
    before = originals(m)
    handle = apply_(m, NORMS)
    with pytest.raises(ValueError, match="already"):
        apply_(m, NORMS)
    handle.undo()
    assert_restored(m, before)

    m.blocks[1].attn2.set_processor(_CustomProcessor())
    with pytest.raises(TypeError, match="WanAttnProcessor"):
        apply_(m, NORMS)
    assert type(m.blocks[0]) is WanTransformerBlock and m.blocks[0].attn1.processor is before[0][1]
    m.blocks[1].attn2.set_processor(before[1][2])

    m.blocks[1].forward = m.blocks[1].forward  # an instance-level forward, as hooks install
    with pytest.raises(ValueError, match="hooks"):
        apply_(m, NORMS)
    del m.blocks[1].forward
    assert_restored(m, before)

    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_to_wan(torch.nn.Linear(2, 2), NORMS)


class _CustomProcessor(WanAttnProcessor):
    pass


def test_fused_block_rejects_bad_temb():
    m = tiny_wan()
    apply_(m, NORMS)
    blk = m.blocks[0]
    x = torch.randn(1, TOKENS, 32, device=DEVICE)
    with pytest.raises(ValueError, match="temb"):
        blk(x, torch.randn(1, 7, 32, device=DEVICE), torch.randn(6, 32, device=DEVICE), None)


def test_quant_filter_keeps_the_conditioning_and_head_modules():
    m = tiny_wan(i2v=True)
    picked = {n for n, mod in m.named_modules() if default_quant_filter(mod, n)}
    linears = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    expected = {n for n in linears if n.startswith("blocks.")}
    assert picked == expected
    assert "blocks.0.attn2.add_k_proj" in picked and "blocks.1.ffn.net.2" in picked
    assert not any(n.startswith(("condition_embedder", "proj_out")) for n in picked)


def test_apply_with_fp8_quant_on_wan():
    """apply_ with a quant config reaches quantize_ with the Wan filter; undo restores the original outputs."""
    from dz_kernels.quant import Float8DynamicActivationFloat8Weight, Float8Linear

    m = tiny_wan()
    x = wan_inputs()
    with torch.no_grad():
        y0 = run(m, x)
        handle = apply_(m, ApplyConfig(attention=True, norms=True, kv_cache=False,
                                       quant=Float8DynamicActivationFloat8Weight(), quant_filter=default_quant_filter))
        assert isinstance(m.blocks[0].attn1.to_q, Float8Linear) and isinstance(m.blocks[1].ffn.net[2], Float8Linear)
        assert type(m.proj_out) is torch.nn.Linear
        assert type(m.condition_embedder.time_proj) is torch.nn.Linear
        y1 = run(m, x)
        handle.undo()
        y2 = run(m, x)
    # FP8 E4M3 weights and activations: about 3 significant bits per element, ~25-30 dB per GEMM
    assert sqnr_db(y0, y1) > 20.0
    assert torch.equal(y2, y0)


# ---------------------------------------------------------------------------------------------- FP8 producer path
def fp8_apply(m, quant=None):
    """apply_ the fused ops and `quant` (default: per-token FP8) to the blocks' linears; returns the handle."""
    from dz_kernels.quant import Float8DynamicActivationFloat8Weight

    quant = Float8DynamicActivationFloat8Weight() if quant is None else quant
    return apply_(m, ApplyConfig(attention=True, norms=True, kv_cache=False, quant=quant))


def record_linear_inputs(m):
    """{qualified name: [input type name, ...]} of every Float8Linear call, and the forward hook handles."""
    from dz_kernels.quant import Float8Linear

    seen, hooks = {}, []
    for name, mod in m.named_modules():
        if isinstance(mod, Float8Linear):
            hooks.append(mod.register_forward_pre_hook(
                lambda mod, args, _n=name: seen.setdefault(_n, []).append(type(args[0]).__name__)))
    return seen, hooks


def count_fp8_norms(monkeypatch):
    """Counts the fused norms' calls with fp8=True (the producer's one quantization per norm)."""
    calls = {"fp8 norm": 0}
    for name in ("layernorm_modulate", "gated_residual_layernorm_modulate"):
        op = getattr(fused, name)

        def counted(*a, _op=op, **k):
            calls["fp8 norm"] += bool(k.get("fp8"))
            return _op(*a, **k)
        monkeypatch.setattr(fused, name, counted)
    return calls


def producer_off(monkeypatch):
    import dz_kernels.diffusers_wan as dw

    monkeypatch.setattr(dw, "_fp8_rows", lambda x, *linears: False)


def undo_and_compare(hooks, handle, got, want):
    """Remove the input hooks, undo apply_, and check the producer's output is finite and the per-linear path's."""
    for h in hooks:
        h.remove()
    handle.undo()
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_fp8_producer_quantizes_once_per_norm_and_changes_no_bit(monkeypatch):
    """Per-token FP8 linears under apply_: norm1 hands one Float8Rows to attn1's q, k and v, norm2 to attn2's q,
    norm3 to the FFN's first linear; attn2's k and v share one quantization of the text context; every other linear
    quantizes its float input itself. So a block quantizes 7 activations where the per-linear path quantized 10, and
    with a float32 stream the output is the per-linear path's, bit for bit. (T2V: the I2V block's image k/v share
    theirs the same way: test_fp8_i2v_image_context_quantized_once.)"""
    from dz_kernels.quant import api as quant_api

    m = tiny_wan()
    handle = fp8_apply(m)
    x = wan_inputs()
    norms = count_fp8_norms(monkeypatch)
    ref_quant = {"n": 0}
    real = quant_api.quantize_fp8_reference       # a CPU Float8Linear's own quantizer of its float input
    monkeypatch.setattr(quant_api, "quantize_fp8_reference", lambda *a, **k: ref_quant.__setitem__(
        "n", ref_quant["n"] + 1) or real(*a, **k))
    seen, hooks = record_linear_inputs(m)
    with torch.no_grad():
        got = run(m, x)
    n = len(m.blocks)
    rows = {f"blocks.{i}.{name}" for i in range(n) for name in
            ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v", "ffn.net.0.proj")}
    assert {k for k, v in seen.items() if v == ["Float8Rows"]} == rows, seen
    floats = sum(v.count("Tensor") for v in seen.values())
    assert all(v == ["Tensor"] for k, v in seen.items() if k not in rows)
    assert norms["fp8 norm"] == 3 * n and floats == 3 * n
    # on the CPU the shared context rows come from the same reference quantizer (one call per block)
    assert ref_quant["n"] == (floats + n if DEVICE.type == "cpu" else 0)

    producer_off(monkeypatch)
    seen.clear()
    norms["fp8 norm"] = ref_quant["n"] = 0
    with torch.no_grad():
        want = run(m, x)
    assert all(set(v) == {"Tensor"} for v in seen.values()) and norms["fp8 norm"] == 0
    assert sum(len(v) for v in seen.values()) == floats + 7 * n
    undo_and_compare(hooks, handle, got, want)


def test_fp8_i2v_image_context_quantized_once(monkeypatch):
    """I2V: attn2's image k/v (add_k_proj, add_v_proj) share one quantization of the image context, as its text k/v
    share one of the text context; with a float32 stream the output is the per-linear path's, bit for bit."""
    m = tiny_wan(i2v=True)
    handle = fp8_apply(m)
    x = wan_inputs(i2v=True)
    seen, hooks = record_linear_inputs(m)
    with torch.no_grad():
        got = run(m, x)
    shared = {f"blocks.{i}.attn2.{name}" for i in range(len(m.blocks))
              for name in ("to_k", "to_v", "add_k_proj", "add_v_proj")}
    assert {k: seen[k] for k in shared} == {k: ["Float8Rows"] for k in shared}, seen
    producer_off(monkeypatch)
    seen.clear()
    with torch.no_grad():
        want = run(m, x)
    assert all(seen[k] == ["Tensor"] for k in shared)
    undo_and_compare(hooks, handle, got, want)


def test_fp8_producer_bf16_as_accurate_as_per_linear(monkeypatch):
    """diffusers' bf16 layout (float32 norms and modulation): the producer quantizes the norm's float32 result, the
    per-linear path its bf16 rounding, which moves some FP8 codes by one step; against the unquantized bf16 fused
    model the producer's output is as accurate as the per-linear path's (within 1 dB; both FP8, > 30 dB)."""
    m = to_bf16_keeping_fp32_modules(tiny_wan())
    x = {k: (v.to(torch.bfloat16) if k != "timestep" else v) for k, v in wan_inputs().items()}
    with torch.no_grad():
        handle = apply_(m, NORMS)
        base = run(m, x).float()
        handle.undo()
        handle = fp8_apply(m)
        seen, hooks = record_linear_inputs(m)
        got = run(m, x)
        producer_off(monkeypatch)
        want = run(m, x)
    handle.undo()
    assert seen["blocks.0.attn1.to_q"] == ["Float8Rows", "Tensor"]
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert not torch.equal(got, want)         # the rounding the producer skips shows
    assert sqnr_db(base, got.float()) > max(30.0, sqnr_db(base, want.float()) - 1.0)


@pytest.mark.filterwarnings("ignore:All-NaN slice")     # the interpreter's max of the NaN row
def test_fp8_producer_nan_row_stays_in_its_row():
    """A NaN in one token of the block input: that token's rows of q, k and v (fed the norm's Float8Rows) are NaN,
    every other token's are finite (the per-token scales keep the NaN in its row)."""
    m = tiny_wan()
    handle = fp8_apply(m)
    x = wan_inputs()
    x["hidden_states"][0, :, 0, 0, 0] = float("nan")      # the first 2x2 patch of frame 0: token 0
    blk, outs = m.blocks[0], {}
    hooks = [getattr(blk.attn1, n).register_forward_hook(
        lambda mod, args, out, _n=n: outs.__setitem__(_n, (type(args[0]).__name__, out))) for n in
        ("to_q", "to_k", "to_v")]
    with torch.no_grad():
        run(m, x)
    for h in hooks:
        h.remove()
    handle.undo()
    for name, (kind, y) in outs.items():
        assert kind == "Float8Rows", name
        assert torch.isnan(y[0, 0]).all(), name
        assert torch.isfinite(y[0, 1:]).all(), name


def test_fp8_producer_off_in_training_and_for_other_linears():
    """Grad enabled (training), or linears that take no FP8 rows (NVFP4, block-scaled FP8): every norm outputs
    floats."""
    from dz_kernels.quant import Float8BlockScaled, NVFP4WeightOnly

    x = wan_inputs()
    for quant, grad in ((None, True), (NVFP4WeightOnly(), False), (Float8BlockScaled(), False)):
        if isinstance(quant, Float8BlockScaled):      # 1x128 blocks need K % 128: a wider tiny model
            m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64,
                                      out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=128, num_layers=1,
                                      rope_max_seq_len=32, in_channels=16).to(DEVICE)
        else:
            m = tiny_wan()
        handle = fp8_apply(m, quant)
        seen = {}
        for name in ("attn1.to_q", "attn2.to_q", "ffn.net.0.proj"):
            m.blocks[0].get_submodule(name).register_forward_pre_hook(
                lambda mod, args, _n=name: seen.setdefault(_n, set()).add(type(args[0]).__name__))
        with torch.set_grad_enabled(grad):
            run(m, x)
        handle.undo()
        assert seen == {n: {"Tensor"} for n in ("attn1.to_q", "attn2.to_q", "ffn.net.0.proj")}, (quant, seen)


def test_fp8_producer_block_traces_whole(monkeypatch):
    """torch.compile(fullgraph=True, aot_eager) of a swapped bf16 block with the FP8 producer and the kernels'
    dispatch (the CUDA path: here the Triton interpreter's custom ops): no graph break, the eager bits, the rows
    taken."""
    from dz_kernels.quant import api as quant_api

    m = to_bf16_keeping_fp32_modules(tiny_wan())
    handle = fp8_apply(m)
    blk, args = m.blocks[0], {}
    hook = blk.register_forward_pre_hook(lambda mod, a, kw: args.update(a=a, kw=kw), with_kwargs=True)
    with torch.no_grad():
        run(m, {k: (v.to(torch.bfloat16) if k != "timestep" else v) for k, v in wan_inputs().items()})
    hook.remove()
    monkeypatch.setattr(quant_api, "_runs_dispatch", lambda t: True)
    seen, hooks = record_linear_inputs(m)
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(*args["a"], **args["kw"])
        want = blk(*args["a"], **args["kw"])
    for h in hooks:
        h.remove()
    handle.undo()
    assert seen["blocks.0.attn1.to_q"] == ["Float8Rows"] * 2 and seen["blocks.0.ffn.net.0.proj"] == ["Float8Rows"] * 2
    assert torch.equal(got, want)
