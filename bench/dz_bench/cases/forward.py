"""forward: one DiT forward of the whole model at the droid-14b inference shape -- the denoising pass of chunk 4
(the last before the release's cache reset; chunk 3 for the tiny config on a CPU):
1785 query tokens (1760 video + 24 action + 1 state) against 6160 cached keys (7 latent frames) + themselves, 769
cross-attention tokens whose keys/values are cached per instruction -- at batch 1 and 2 (both CFG branches batched).

Peers: the plain model (the release's per-block attention) with the flash or the cuDNN SDPA backend, and the same
with every block compiled by torch.compile. Ours: the model with dz_kernels.apply_ (attention, fused norms, fused
KV-cache path), eager and compiled. FLOPs: the physical work of the forward (linears + visible attention).
On a CPU (small) the tiny config runs, and the compiled rows are unavailable.
"""
from __future__ import annotations

import torch

from dz_bench.harness import Case, Unavailable, register

from dreamzero.layout import layout_for_config

from ._model_common import ModelState, bench_config, last_chunk_before_reset, random_model, sdpa_backend


def forward_flops(cfg, layout, batch: int) -> int:
    """Linear FLOPs of every query token (self q,k,v,o, cross q,o, FFN) + visible self-attention + cross-attention."""
    C, Fd, L = cfg.dim, cfg.ffn_dim, layout.q_len
    per_token = 2 * (4 * C * C + 2 * C * C + 2 * C * Fd)
    cross = 4 * L * (cfg.text_len + cfg.clip_tokens) * C
    attn = layout.attention_flops(1, cfg.num_heads, cfg.head_dim)
    return batch * cfg.num_layers * (per_token * L + cross + attn)


@register("forward")
def cases(ctx):
    batches = (1,) if ctx.small else (1, 2)
    for batch in batches:
        state = {}

        def setup():
            if "x" in state:
                return state["x"]
            m = random_model(ctx)
            cfg = m.cfg
            p = next(m.parameters())
            g = torch.Generator().manual_seed(0)

            def r(*s):
                return torch.randn(*s, generator=g).to(p.device, p.dtype)
            chunk = last_chunk_before_reset(cfg)
            lay = m.layout("denoise", chunk=chunk, cached_frames=tuple(range(1 + (chunk - 1) * cfg.frames_per_chunk)))
            with torch.no_grad():
                ckv = m.context_kv(r(batch, cfg.text_len, cfg.text_dim), r(batch, cfg.clip_tokens, cfg.clip_dim))
            H, W, n = cfg.latent_height, cfg.latent_width, cfg.frames_per_chunk
            inputs = dict(noisy=r(batch, 16, n, H, W), noisy_cond=r(batch, 20, n, H, W),
                          t_video=torch.full((batch, n), 500, device=p.device),
                          actions=r(batch, cfg.actions_per_chunk, cfg.action_dim),
                          t_action=torch.full((batch, cfg.actions_per_chunk), 500, device=p.device),
                          state=r(batch, cfg.states_per_chunk, cfg.state_dim))
            clean = [r(batch, 16, 1, H, W)] + [r(batch, 16, n, H, W) for _ in range(chunk - 1)]
            state["x"] = (m, lay, ckv, clean, inputs)
            return state["x"]

        def make(backend=None, kernels=False, compiled=False):
            def factory():
                m, lay, ckv, clean, inputs = setup()
                ms = state.setdefault("ms", ModelState(m))
                ms.restore()
                if compiled:
                    if ctx.device != "cuda":
                        raise Unavailable("torch.compile rows run on CUDA only")
                    for i, blk in enumerate(m.blocks):
                        m.blocks[i] = torch.compile(blk, dynamic=False)
                if kernels:
                    ms.use_kernels(ctx=ctx)
                c = m.new_cache(batch)                    # filled as in an episode: first frame, chunks 1-3
                with torch.no_grad():
                    for chunk, lat in enumerate(clean):
                        cond = lat.new_zeros(lat.shape[0], 20, *lat.shape[2:])
                        m(c.layout("first" if chunk == 0 else "observe", chunk), clean=lat, clean_cond=cond,
                          context_kv=ckv, cache=c)
                assert c.layout("denoise", lay.parts[0].frames[0] // m.cfg.frames_per_chunk + 1) == lay

                def run():
                    with torch.no_grad(), sdpa_backend(ctx, backend):
                        return m(lay, context_kv=ckv, cache=c, **inputs)[1]
                return run
            return factory

        m_cfg = bench_config(ctx)
        chunk = last_chunk_before_reset(m_cfg)
        lay = layout_for_config(m_cfg, "denoise", chunk=chunk,
                                cached_frames=tuple(range(1 + (chunk - 1) * m_cfg.frames_per_chunk)))
        impls = {"eager-flash": make("flash"), "eager-cudnn": make("cudnn"),
                 "compile-cudnn": make("cudnn", compiled=True), "dz": make(None, kernels=True),
                 "dz+compile": make(None, kernels=True, compiled=True)}
        yield Case(case=f"denoise-chunk{chunk}-b{batch}", params={"config": m_cfg.name, "batch": batch,
                                                            "q_tokens": lay.q_len, "cached_tokens": lay.n_cached},
                   flops=forward_flops(m_cfg, lay, batch), impls=impls)
