"""Tuning sweeps of the quantized GEMMs (dz_bench.tune fp8, nvfp4): FP8 GEMM tiles, the FP8 linear's path and
activation quantizer; the NVFP4 split-K tiles and the W4A16 path."""
from __future__ import annotations

import time
from typing import Callable

from .core import Tuner, pick, run_candidates, table_entry


def _linear_inputs(t, M, K, N, seed):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(t.device, torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(t.device, torch.bfloat16)
    b = (0.1 * torch.randn(N, generator=g)).to(t.device, torch.bfloat16)
    return x, w, b


def _quant_shapes(t: Tuner, small_m: bool):
    if t.small:
        return [(128, 128)], ([1, 16] if small_m else [48])
    return [(5120, 5120), (5120, 13824), (13824, 5120)], ([1, 16] if small_m else [1785, 3570])


def _m_entries(t, kind_rows: dict, make_match, keep: Callable[[dict], dict]) -> list:
    """Entries for one kind from {(k, n): {m: (best, default, case)}}: one per measured m, m_max = m in ascending
    order, the largest m's also as the catch-all of its (k, n)."""
    out = []
    for (K, N), by_m in kind_rows.items():
        ms = sorted(by_m)
        for j, m in enumerate(ms):
            best, dflt, case = by_m[m]
            if best is None:
                continue
            match = make_match(K, N)
            if j < len(ms) - 1:
                match["m_max"] = m
            out.append(table_entry(t, match, keep(best.config), case, best, dflt))
    return out


GEMM_GRID = [  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
    (128, 128, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 3),
    (64, 256, 128, 8, 8, 3),
]
GEMM_SMALL_M = [(16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 4), (64, 64, 128, 1, 4, 4)]
# the split-K kernel's candidates besides the table's default: (BLOCK_N, BLOCK_K, waves, warps, stages); none spills
# registers on sm_90 (tests/aot_capture.py; 64 x 256 and 128 x 128 on 4 warps spilled 8-24 bytes a thread, 128 x 256
# on 8 warps 96)
SPLITK_GRID = [(64, 256, 4, 8, 3), (128, 128, 4, 8, 3), (32, 256, 4, 4, 3), (64, 128, 8, 4, 4), (128, 64, 4, 4, 4)]


def gemm_configs(small: bool, M: int) -> list[dict]:
    """The FP8 GEMM sweep's candidates at M: the autotuned kernel, then fixed tiles (autotune off: a forced entry
    is merged over the table's default, which says autotune)."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    grid = [(16, 64, 64, 2, 1, 1)] if small else GEMM_SMALL_M if M <= 64 else GEMM_GRID
    return [{"autotune": True}] + [dict(zip(keys, g), autotune=False) for g in grid]


def splitk_configs(small: bool, default: dict) -> list[dict]:
    """The split-K sweep's candidates: the table's default first."""
    if small:
        return [dict(default), dict(default, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)]
    return [dict(default)] + [dict(default, BLOCK_N=bn, BLOCK_K=bk, waves=wv, num_warps=w, num_stages=s)
                              for bn, bk, wv, w, s in SPLITK_GRID]


def tune_fp8(t: Tuner) -> dict:
    import torch
    import torch.nn.functional as F

    from dz_kernels import configs
    from dz_kernels.quant import ops as fp8, quantize_fp8_rowwise
    from dz_kernels.quant.dispatch import scaled_mm_linear
    from dz_kernels.quant.reference import fp8_gemm_reference, quantize_fp8_reference

    entries = {"gemm": [], "quant_rows": [], "linear_path": []}
    shapes, ms = _quant_shapes(t, small_m=False)
    _, small_ms = _quant_shapes(t, small_m=True)
    gemm_best, path_best = {}, {}
    stop = time.time() + 0.8 * t.left()
    for K, N in shapes:
        # one decode-like M (the entry also serves smaller M: entries match m_max ascending), the chunk shapes
        for M in small_ms[-1:] + ms[:2]:
            if time.time() > stop:
                break
            case = f"fp8-linear/M{M}-K{K}-N{N}"

            def prepare_gemm(cfg, seed, M=M, K=K, N=N):
                # the reference: the float64 product of the quantized operands (the quantizers are bit-exact with
                # reference.py), so the bar measures the GEMM's own accumulation and output rounding
                x, w, b = _linear_inputs(t, M, K, N, seed)
                qw, sw = quantize_fp8_rowwise(w)
                qa, sa = quantize_fp8_reference(x, "row")
                ref = fp8_gemm_reference(qa, sa, qw, sw, bias=b, out_dtype=None, compute_dtype=torch.float64)

                def run():
                    with configs.forced("fp8", "gemm", cfg):
                        return fp8.fp8_linear(x, qw, sw.reshape(-1), b)
                return run, ref

            rows = run_candidates(t, "fp8", "gemm", case, gemm_configs(t.small, M), prepare_gemm)
            best, dflt = pick(rows)
            gemm_best.setdefault((K, N), {})[M] = (best, dflt, case)

            # the path: our FP8 GEMM (at its best config), our quantizer + cuBLAS FP8, bf16 cuBLAS
            gcfg = best.config if best is not None else {"autotune": True}

            def prepare_path(cfg, seed, M=M, K=K, N=N, gcfg=gcfg):
                x, w, b = _linear_inputs(t, M, K, N, seed)
                qw, sw = quantize_fp8_rowwise(w)
                ref = x.float() @ w.float().t() + b.float()
                path = cfg["path"]
                if path == "bf16":
                    return (lambda: F.linear(x, w, b)), ref
                if path == "scaled_mm":
                    if t.device != "cuda" and not t.small:
                        raise RuntimeError("scaled_mm is timed on CUDA")
                    return (lambda: scaled_mm_linear(x, qw, sw.reshape(-1), b, torch.bfloat16)), ref

                def run():
                    with configs.forced("fp8", "gemm", gcfg):
                        return fp8.fp8_linear(x, qw, sw.reshape(-1), b)
                return run, ref

            # against the unquantized product: FP8's own error (about 4e-2 relative) is inside the bar
            prow = run_candidates(t, "fp8", "path", case, [{"path": "triton"}, {"path": "scaled_mm"},
                                                            {"path": "bf16"}], prepare_path, bar=0.1)
            # the path is a choice of function, not of tiles: the fastest wins outright (no default margin)
            ok = [r for r in prow if r.status == "ok"]
            pbest = min(ok, key=lambda r: r.median_ms) if ok else None
            path_best.setdefault((K, N), {})[M] = (pbest, prow[0] if prow[0].status == "ok" else None, case)

    def gemm_match(K, N):
        return {"block_scaled": False, "n": N, "k": K}

    entries["gemm"] = _m_entries(t, gemm_best, gemm_match, lambda c: c)
    entries["linear_path"] = _m_entries(t, path_best, gemm_match, lambda c: c)

    # the activation quantizer alone, at the widest K (one entry per K measured)
    for K in sorted({k for k, _ in shapes}):
        M = ms[1] if len(ms) > 1 else ms[0]
        case = f"quant-rows/M{M}-K{K}"
        # first the table's default (one pass over a row of up to 8192 columns, else the two-pass 4 x 1024)
        cands = [{"BLOCK_M": 1, "BLOCK_K": 8192, "num_warps": 8} if K <= 8192 else
                 {"BLOCK_M": 4, "BLOCK_K": 1024, "num_warps": 4}]
        if not t.small:
            cands += [{"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": w}
                      for bm, bk, w in ((4, 1024, 4), (1, 2048, 4), (2, 1024, 4), (4, 2048, 8), (8, 1024, 8),
                                        (1, 8192, 4), (2, 8192, 8), (1, 16384, 16))]
            cands = [c for i, c in enumerate(cands) if c not in cands[:i]]

        def prepare_q(cfg, seed, M=M, K=K):
            x, _, _ = _linear_inputs(t, M, K, 16, seed)
            rq, rs = quantize_fp8_reference(x, "row")

            def run():
                with configs.forced("fp8", "quant_rows", cfg):
                    q, s = quantize_fp8_rowwise(x)
                return [q.float() * s, s]
            return run, [rq.float() * rs, rs]

        rows = run_candidates(t, "fp8", "quant_rows", case, cands, prepare_q, bar=1e-6)
        best, dflt = pick(rows)
        if best is not None:
            entries["quant_rows"].append(table_entry(t, {"k": K}, best.config, case, best, dflt))
    return entries


def tune_nvfp4(t: Tuner) -> dict:
    """The split-K kernel's tiles at decode-like M, then which W4A16 path runs per shape: split-K (at its best),
    dequant + dense GEMM, or the tiled kernel, at the largest decode-like M and at the chunk M."""
    import torch

    from dz_kernels import configs
    from dz_kernels.quant import ops as nvfp4
    from dz_kernels.quant import reference as fmt

    entries = {"splitk": [], "w4a16_path": []}
    shapes, ms = _quant_shapes(t, small_m=False)
    _, small_ms = _quant_shapes(t, small_m=True)
    split_best, path_best = {}, {}

    def prepare(path, M, K, N, splitk_cfg=None):
        def prep(cfg, seed):
            _, w, b = _linear_inputs(t, 1, K, N, seed)
            wq, ws, wg = nvfp4.quantize_nvfp4(w)
            x, _, _ = _linear_inputs(t, M, K, 16, seed + 7)
            ref = fmt.nvfp4_gemm_w4a16_reference(x, wq, ws, wg, bias=b, out_dtype=None,
                                                 compute_dtype=torch.float64)
            p = cfg.get("path", path)
            sk = splitk_cfg if "path" in cfg else cfg

            def run():
                with configs.forced("nvfp4", "w4a16_path", {"path": p}), \
                        configs.forced("nvfp4", "splitk", sk or {}):
                    return nvfp4.nvfp4_gemm_w4a16(x, wq, ws, wg, bias=b)
            return run, ref
        return prep

    splitk_default = configs.table("nvfp4")["defaults"]["splitk"][-1]["config"]
    stop = time.time() + 0.7 * t.left()
    for K, N in shapes:
        for M in small_ms:
            if time.time() > stop:
                break
            case = f"nvfp4-w4a16/M{M}-K{K}-N{N}"
            rows = run_candidates(t, "nvfp4", "splitk", case, splitk_configs(t.small, splitk_default),
                                  prepare("splitk", M, K, N))
            split_best.setdefault((K, N), {})[M] = (*pick(rows), case)
    for K, N in shapes:
        for M in small_ms[-1:] + ms[:1]:
            if t.left() <= 0:
                break
            case = f"nvfp4-w4a16/M{M}-K{K}-N{N}"
            sb = split_best.get((K, N), {}).get(small_ms[-1], (None,))[0]
            sk = sb.config if sb is not None else dict(splitk_default)
            paths = ["splitk", "dequant", "tiled"] if M in small_ms else ["dequant", "tiled"]
            rows = run_candidates(t, "nvfp4", "path", case, [{"path": p} for p in paths],
                                  prepare("splitk", M, K, N, splitk_cfg=sk))
            ok = [r for r in rows if r.status == "ok"]       # a choice of function: the fastest wins outright
            if ok:
                win = min(ok, key=lambda r: r.median_ms)
                path_best.setdefault((K, N), {})[M] = (win, rows[0] if rows[0].status == "ok" else None, case)

    def match(K, N):
        return {"n": N, "k": K}

    entries["splitk"] = _m_entries(t, split_best, match, lambda c: c)
    entries["w4a16_path"] = _m_entries(t, path_best, match, lambda c: c)
    return entries

