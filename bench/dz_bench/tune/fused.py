"""Tuning sweep of the fused DiT-block ops (dz_bench.tune fused): warps for the row kernels (LayerNorm +
modulate, forward and backward), block sizes for the elementwise ones (GELU, gated residual)."""
from __future__ import annotations

from .core import BF16_BAR, Tuner, pick, pick_sum, run_candidates, table_entry


def _fused_rows(t):
    if t.small:
        return 256, 512, [(1, 64)], [(1, 64)]
    return 5120, 13824, [(2, 1785)], [(1, 15940)]


def tune_fused(t: Tuner) -> dict:
    import torch

    import dz_kernels.fused as fz
    from dz_kernels import configs

    C, FF, infer, train = _fused_rows(t)
    block_c = 1 << (C - 1).bit_length()
    entries = {"row_fwd": [], "row_bwd": [], "elementwise": []}
    dt = torch.bfloat16

    def rnd(shape, seed, scale=1.0):
        g = torch.Generator(device=t.device).manual_seed(seed)
        return (scale * torch.randn(shape, device=t.device, generator=g)).to(dt)

    def fwd_prep(kind, op, B, L, width):
        def prep(cfg, seed):
            if op == "layernorm_modulate":
                args = [rnd((B, L, C), seed), rnd((B, L, C), seed + 1, 0.5), rnd((B, L, C), seed + 2, 0.5)]
                fn, ref = (lambda a: fz.layernorm_modulate(*a, 1e-6)), \
                    (lambda a: fz.layernorm_modulate_reference(*[x.float() for x in a], 1e-6))
            elif op == "gelu_tanh":
                args = [rnd((B, L, width), seed, 2.0)]
                fn, ref = (lambda a: fz.gelu_tanh(*a)), (lambda a: fz.gelu_tanh_reference(a[0].float()))
            else:  # gated_residual
                args = [rnd((B, L, C), seed), rnd((B, L, C), seed + 1), rnd((B, L, C), seed + 2, 0.5)]
                fn, ref = (lambda a: fz.gated_residual(*a)), \
                    (lambda a: fz.gated_residual_reference(*[x.float() for x in a]))

            def run():
                with configs.forced("fused", kind, cfg):
                    return fn(args)
            return run, ref(args)
        return prep

    def bwd_prep(kind, B, L):
        def prep(cfg, seed):
            x = rnd((B, L, C), seed).requires_grad_()
            sh, sc = (rnd((B, L, C), seed + i, 0.5).requires_grad_() for i in (1, 2))
            g = rnd((B, L, C), seed + 3)
            with torch.enable_grad():
                ref = torch.autograd.grad(fz.layernorm_modulate_reference(x.double(), sh.double(), sc.double(), 1e-6),
                                          (x, sh, sc), g.double())
                with configs.forced("fused", kind, cfg):
                    out = fz.layernorm_modulate(x, sh, sc, 1e-6)

            def run():
                with torch.enable_grad(), configs.forced("fused", kind, cfg):
                    return torch.autograd.grad(out, (x, sh, sc), g, retain_graph=True)
            return run, ref
        return prep

    tables = configs.table("fused")["defaults"]

    def default_of(kind, **key):
        return configs.lookup("fused", kind, "cpu", **key).config

    # row kernels, forward (key block_c): LayerNorm + modulate at the inference and training shapes
    fwd_default = default_of("row_fwd", block_c=block_c)
    warps = [2, 4] if t.small else [4, 8, 16, 32]
    cands = [fwd_default] + [{"num_warps": w} for w in warps if w != fwd_default["num_warps"]]
    agg = {}
    for B, L in infer + train:
        case = f"layernorm_modulate/fwd/{B}x{L}"
        for r in run_candidates(t, "fused", "row_fwd", case, cands, fwd_prep("row_fwd", "layernorm_modulate", B, L,
                                                                           C), bar=BF16_BAR):
            agg.setdefault(r.candidate, []).append(r)
    best, dflt = pick_sum(agg)
    if best is not None:
        entries["row_fwd"].append(table_entry(t, {"block_c": block_c}, best.config, "layernorm_modulate/fwd (sum over "
                                         "shapes)", best, dflt))

    # row kernels, backward: warps and reduction programs at the training shape
    bwd_default = default_of("row_bwd", block_c=block_c)
    cands = [bwd_default]
    if t.small:
        cands.append({"num_warps": 2, "programs_per_sm": 2})
    else:
        cands += [{"num_warps": w, "programs_per_sm": p} for w, p in ((16, 4), (8, 4), (32, 2), (16, 2), (32, 8),
                                                                      (16, 8))]
    B, L = train[0]
    rows = run_candidates(t, "fused", "row_bwd", f"layernorm_modulate/bwd/{B}x{L}", cands, bwd_prep("row_bwd", B, L),
                          bar=BF16_BAR)
    best, dflt = pick(rows)
    if best is not None:
        entries["row_bwd"].append(table_entry(t, {"block_c": block_c}, best.config, f"layernorm_modulate/bwd/{B}x{L}",
                                         best, dflt))

    # elementwise kernels: GELU (FFN width) and the gated residual, forward, at both shapes
    ew_default = tables["elementwise"][-1]["config"]
    cands = [ew_default] + ([{"BLOCK": 512, "num_warps": 2}] if t.small else
                            [{"BLOCK": b, "num_warps": w} for b, w in ((2048, 4), (2048, 8), (4096, 8), (512, 4),
                                                                       (8192, 16))])
    for op, width in (("gelu_tanh", FF), ("gated_residual", C)):
        agg = {}
        for B, L in infer + train:
            case = f"{op}/fwd/{B}x{L}"
            for r in run_candidates(t, "fused", f"elementwise-{op}", case, cands,
                                    fwd_prep("elementwise", op, B, L, width), bar=BF16_BAR):
                agg.setdefault(r.candidate, []).append(r)
        best, dflt = pick_sum(agg)
        if best is not None:
            for direction in ("fwd", "bwd"):   # the backward kernels share the forward's memory pattern
                entries["elementwise"].append(table_entry(t, {"op": f"{op}_{direction}"}, best.config,
                                                     f"{op}/fwd (sum over shapes)", best, dflt))
    return entries
