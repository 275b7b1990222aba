"""Tuning sweeps of the attention kernel (dz_bench.tune attention, attention:fwd, attention:bwd): forward tiles
at the training mask and the control step, then the backward's tiles, dq pass, atomic dq and grid order."""
from __future__ import annotations

import dataclasses
import time

from .core import Tuner, pick, run_candidates, source_line, table_entry


def _attn_shapes(t: Tuner):
    """{mode: (name, layout, B, H, D)}: training mask (B=1) and the control step (B=2, the CFG branches)."""
    from dreamzero.config import get_config
    from dreamzero.layout import inference_layout, layout_for_config

    if t.small:
        return {"train": ("train-tiny", layout_for_config(get_config("tiny"), "train", num_chunks=2), 1, 2, 16),
                "infer": ("control-tiny", inference_layout(6, 2, 3, 1, "control", 3, (0, 1, 2)), 1, 2, 16)}
    cfg = get_config("droid-14b")
    return {"train": ("train-droid-14b-B1", layout_for_config(cfg, "train"), 1, cfg.num_heads, cfg.head_dim),
            "infer": ("control-droid-14b-B2", layout_for_config(cfg, "control", chunk=5,
                                                                cached_frames=tuple(range(7))), 2,
                      cfg.num_heads, cfg.head_dim)}


def _attn_inputs(t, lay, B, H, D, seed, grad=False):
    import torch

    g = torch.Generator(device=t.device).manual_seed(seed)
    return [torch.randn(B, n, H, D, device=t.device, generator=g).to(torch.bfloat16)
            for n in (lay.q_len, lay.k_len, lay.k_len)]


def _attn_config(base, **changes):
    """A TileConfig field dict: base with changes."""
    d = dict(base)
    d.update(changes)
    return d


def fwd_candidates(t: Tuner, default: dict) -> list:
    if t.small:
        return [default, _attn_config(default, fwd=[16, 32], heads_first=True)]
    # none of these spills registers at head dim 128 on sm_90 (compile_check, triton 3.6); 4-warp tiles of 128 rows
    # or 128 keys spill 1.2-3.7 KB a thread there and are left out
    grid = [(128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)]
    return [default] + [_attn_config(default, fwd=[m, n], fwd_warps=w, fwd_stages=s) for m, n, w, s in grid]


def bwd_dkv_candidates(t: Tuner, default: dict) -> list:
    base = _attn_config(default, atomic_dq=False)
    if t.small:
        return [base, _attn_config(base, dkv=[16, 32])]
    # none of these spills registers at head dim 128 on sm_90 (compile_check); the 4-warp 32x128 tile spilled 2.8 KB
    grid = [(32, 64, 8, 3), (16, 64, 8, 3), (64, 64, 8, 2), (32, 128, 8, 2)]
    return [base] + [_attn_config(base, dkv=[m, n], bwd_warps=w, bwd_stages=s) for m, n, w, s in grid]


def bwd_dq_candidates(t: Tuner, base: dict) -> list:
    if t.small:
        return [base, _attn_config(base, dq=[32, 16])]
    grid = [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2)]
    return [base] + [_attn_config(base, dq=[m, n], dq_warps=w, dq_stages=s) for m, n, w, s in grid]


def _tile_stats(lay, cfg: dict) -> str:
    """Schedule facts of the forward tiles on this layout (host, exact): full / partial tiles visited, and the
    useful fraction of the visited tiles' score entries (visible pairs over visited tiles x BLOCK_M x BLOCK_N)."""
    import dz_kernels.attention as attn

    bm, bn = cfg["fwd"]
    c = attn.schedule_for(lay, bm, bn).counts()
    visited = c["full"] + c["partial"]
    useful = lay.visible_pairs() / max(1, visited * bm * bn)
    return f"tiles {bm}x{bn}: {c['full']} full + {c['partial']} partial visited, {useful:.0%} of their entries visible"


def _default_tiles(t: Tuner, D: int, mode: str) -> dict:
    """The current default TileConfig (the table's on a GPU, the interpreter's on a CPU) as a JSON-able dict."""
    import torch

    from dz_kernels.attention import default_config

    d = dataclasses.asdict(default_config(torch.device(t.device), torch.bfloat16, D, mode))
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    d["dq_warps"] = d["dq_warps"] or d["bwd_warps"]
    d["dq_stages"] = d["dq_stages"] or d["bwd_stages"]
    return d


def tune_attention(t: Tuner, parts=("fwd", "bwd")) -> dict:
    """Forward at the training mask (mode train) and the control step (mode infer), then the backward at the
    training mask: dk/dv tiles (with the separate dq pass), dq tiles, then atomic dq and the grid order."""
    import torch

    import dz_kernels.attention as attn
    from dreamzero.attention import attention_blockwise as attn_ref
    from dz_kernels.attention import TileConfig

    shapes = _attn_shapes(t)
    entries = {"tiles": []}
    start, budget, deadline_all = time.time(), max(t.left(), 0.0), t.deadline
    fwd_share = 0.45 if "bwd" in parts else 1.0

    def prepare_fwd(lay, B, H, D):
        def prepare(cfg, seed):
            tc = TileConfig.from_dict(cfg)
            tc.validate()
            q, k, v = _attn_inputs(t, lay, B, H, D, seed)
            ref = attn_ref(q, k, v, lay)
            # sdpa_blocks > 1: the op's per-block SDPA dispatch (what the control step runs with that setting)
            dense = tc.sdpa_blocks > 1
            return (lambda: attn.layout_attention(q, k, v, lay, config=tc, dense_sdpa=dense)), ref
        return prepare

    train_rows = []
    if "fwd" in parts:
        t.deadline = min(deadline_all, start + fwd_share * budget)
        for mode in ("train", "infer"):
            name, lay, B, H, D = shapes[mode]
            default = _default_tiles(t, D, mode)
            cands = fwd_candidates(t, default)
            if mode == "infer" and train_rows and not t.small:   # the train sweep's best five, then the default
                ranked = sorted((r for r in train_rows if r.status == "ok"), key=lambda r: r.median_ms)
                cands = [default] + [dict(default, **{k: r.config[k] for k in ("fwd", "fwd_warps", "fwd_stages")})
                                     for r in ranked[:5]]
                cands = [c for i, c in enumerate(cands) if c not in cands[:i]]
            stats = (lambda cfg, lay=lay: _tile_stats(lay, cfg))
            rows = run_candidates(t, "attention", f"fwd-{mode}", name, cands, prepare_fwd(lay, B, H, D), note=stats)
            best, _ = pick(rows)
            if best is not None and not t.small:     # then the two launch options on the winner
                extra = [_attn_config(best.config, heads_first=True), _attn_config(best.config, fwd_ws=True)]
                rows += run_candidates(t, "attention", f"fwd-{mode}-options", name, extra, prepare_fwd(lay, B, H, D),
                                       reference_config=default)
            if mode == "train":
                train_rows = rows
            best, dflt = pick(rows)
            if best is not None and mode == "infer":   # the kernel's best against one SDPA call per dense block
                sdpa = run_candidates(t, "attention", "fwd-infer-dispatch", name,
                                      [_attn_config(best.config, sdpa_blocks=2)], prepare_fwd(lay, B, H, D),
                                      reference_config=default)
                if sdpa[0].status == "ok" and sdpa[0].median_ms < best.median_ms:
                    best = sdpa[0]
            if best is not None:
                keep = {k: best.config[k] for k in ("fwd", "fwd_warps", "fwd_stages", "heads_first", "fwd_ws",
                                                    "sdpa_blocks")}
                entries["tiles"].append(table_entry(t, {"head_dim": D, "dtype": "bfloat16", "mode": mode}, keep,
                                               f"fwd {name}", best, dflt))

    if "bwd" in parts:
        t.deadline = deadline_all
        name, lay, B, H, D = shapes["train"]
        default = _default_tiles(t, D, "train")
        train_fwd = [e for e in entries["tiles"] if e["match"].get("mode") == "train"]
        if train_fwd:          # the forward this sweep just chose runs under every backward candidate
            default.update(train_fwd[0]["config"])

        def prepare_bwd(cfg, seed):
            # forward + backward through the public op (the forward fixed across the backward candidates): what a
            # training step runs, and what the bench's train/fwd+bwd case times
            tc = TileConfig.from_dict(cfg)
            tc.validate()
            q, k, v = (x.requires_grad_() for x in _attn_inputs(t, lay, B, H, D, seed))
            dout = torch.randn(q.shape, device=t.device, generator=torch.Generator(device=t.device)
                               .manual_seed(seed + 1)).to(torch.bfloat16)
            with torch.enable_grad():
                ref = torch.autograd.grad(attn_ref(q, k, v, lay), (q, k, v), dout)

            def run():
                with torch.enable_grad():
                    out = attn.layout_attention(q, k, v, lay, config=tc, dense_sdpa=False)
                    return torch.autograd.grad(out, (q, k, v), dout)
            return run, ref

        def sweep(label, cands):
            return run_candidates(t, "attention", label, name, cands, prepare_bwd, reference_config=default)

        rows = sweep("bwd-default", [default])                 # the current default (atomic dq) is the baseline
        rows += sweep("bwd-dkv", bwd_dkv_candidates(t, default))
        best, _ = pick(rows[1:])
        base = best.config if best is not None else _attn_config(default, atomic_dq=False)
        rows += sweep("bwd-dq", bwd_dq_candidates(t, base)[1:])
        best, _ = pick(rows[1:])
        base = best.config if best is not None else base
        more = [_attn_config(base, atomic_dq=True)]
        if not t.small:
            more.append(_attn_config(base, heads_first=not base.get("heads_first", False)))
        rows += sweep("bwd-atomic-and-order", more)
        best, dflt = pick(rows)
        if best is not None:
            keep = {k: best.config[k] for k in ("dkv", "dq", "bwd_warps", "bwd_stages", "dq_warps", "dq_stages",
                                                "atomic_dq", "heads_first")}
            if train_fwd:      # the backward's fields join the forward's train entry (one entry per key)
                train_fwd[0]["config"].update(keep)
                train_fwd[0]["source"] += "; backward: " + source_line(t, f"fwd+bwd {name}", best, dflt)
                train_fwd[0]["measured_bwd"] = table_entry(t, {}, {}, f"fwd+bwd {name}", best, dflt)["measured"]
            else:
                entries["tiles"].append(table_entry(t, {"head_dim": D, "dtype": "bfloat16", "mode": "train"}, keep,
                                               f"fwd+bwd {name}", best, dflt))
    t.deadline = deadline_all
    return entries

