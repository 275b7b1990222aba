"""Tuning sweep of the KV-cache epilogue (dz_bench.tune kv_cache): launch configs per cache dtype, then which
backend (Triton at its best or CUDA) backend="auto" runs."""
from __future__ import annotations

from .core import BF16_BAR, Tuner, pick, run_candidates, table_entry


def tune_kv_cache(t: Tuner) -> dict:
    import torch

    from dreamzero.config import get_config
    from dreamzero.layout import layout_for_config
    from dreamzero.rope import rope_tables
    from dz_kernels import configs
    from dz_kernels.kv_cache import FusedKVCache, qk_norm_rope_kv_write
    from dz_kernels.kv_cache import cuda as kv_cuda
    from dz_kernels.kv_cache.reference import qk_norm_rope_kv_reference

    cfg = get_config("tiny" if t.small else "droid-14b")
    cached = tuple(range(1 + (cfg.max_chunks - 1) * cfg.frames_per_chunk))
    lay = layout_for_config(cfg, "observe", chunk=cfg.max_chunks, cached_frames=cached)
    H, D, C = cfg.num_heads, cfg.head_dim, cfg.dim
    entries = {"epilogue": [], "backend": []}
    default = configs.table("kv_cache")["defaults"]["epilogue"][-1]["config"]
    cands = [default] + ([{"block_rows": 2, "num_warps": 2}] if t.small else
                         [{"block_rows": r, "num_warps": w} for r, w in ((1, 4), (1, 8), (2, 8), (1, 16))])
    B = 2
    for fp8 in (False, True):
        cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
        case = f"observe-{'fp8' if fp8 else 'bf16'}/B{B}"

        def prep(c, seed, fp8=fp8):
            g = torch.Generator(device=t.device).manual_seed(seed)
            qkv = torch.randn(B, lay.q_len, 3 * C, device=t.device, generator=g).to(torch.bfloat16)
            q, k, v = qkv.split(C, dim=-1)
            wq, wk = ((1 + 0.1 * torch.randn(C, device=t.device, generator=g)).to(torch.bfloat16) for _ in range(2))
            cos, sin = (x.to(t.device) for x in rope_tables(lay, cfg))
            cache = FusedKVCache(cfg, B, torch.bfloat16, device=t.device, num_layers=1, fp8=fp8, backend="torch")
            cache.write_pos.fill_(lay.n_cached)
            ks, vs = (cache.k_scale[0], cache.v_scale[0]) if fp8 else (None, None)
            a, b = lay.n_cached, lay.n_cached + lay.q_len
            refk, refv = cache.k[0].clone(), cache.v[0].clone()
            refks, refvs = (ks.clone(), vs.clone()) if fp8 else (None, None)
            for buf in (cache.k[0], cache.v[0]) + ((ks, vs) if fp8 else ()):   # rows the kernel must write
                buf[:, lay.n_cached:lay.n_cached + lay.q_len] = float("nan")
            ref_q = qk_norm_rope_kv_reference(q, k, v, wq, wk, 1e-6, cos, sin, H, refk, refv, lay.n_cached,
                                              refks, refvs)

            def rows_of(kc, vc, kss, vss):
                if fp8:
                    return [kc[:, a:b].float() * kss[:, a:b, :, None], vc[:, a:b].float() * vss[:, a:b, :, None]]
                return [kc[:, a:b], vc[:, a:b]]

            backend = c.get("backend", "triton")

            def run():
                with configs.forced("kv_cache", "epilogue", c):
                    q_rot = qk_norm_rope_kv_write(q, k, v, wq, wk, 1e-6, cos, sin, H, cache.k[0], cache.v[0],
                                                  cache.write_pos, ks, vs, backend=backend, check=False)
                return [q_rot] + rows_of(cache.k[0], cache.v[0], ks, vs)
            return run, [ref_q] + rows_of(refk, refv, refks, refvs)

        bar = BF16_BAR if not fp8 else 0.05
        rows = run_candidates(t, "kv_cache", "epilogue", case, cands, prep, bar=bar)
        best, dflt = pick(rows)
        if best is not None:
            entries["epilogue"].append(table_entry(t, {"H": H, "D": D, "cache": configs.dtype_name(cache_dtype)},
                                              best.config, case, best, dflt))
            # which backend backend="auto" runs: the Triton kernel at its best, or the CUDA kernels
            if t.device == "cuda" and kv_cuda.available()[0]:
                cuda_row = run_candidates(t, "kv_cache", "backend", case, [dict(best.config, backend="cuda")], prep,
                                          bar=bar, reference_config=best.config)[0]
                win = cuda_row if cuda_row.status == "ok" and cuda_row.median_ms < best.median_ms else best
                entries["backend"].append(table_entry(t, {"cache": configs.dtype_name(cache_dtype)},
                                                 {"backend": "cuda" if win is cuda_row else "triton"},
                                                 f"{case}: triton at its best vs cuda", win, best))
    return entries
