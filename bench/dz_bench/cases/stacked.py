"""stacked: the paper's Table 1 on one device -- latency of a whole control step, each optimization added on top of
the ones above, every row measured in the same run against our baseline (eager bf16, 16 steps, sequential CFG,
flash SDPA). This is the project's main job.

One control step = ground-truth replacement of the chunk just executed + denoising of the next chunk + action
smoothing, at the cache position of the 4th chunk (6160 cached keys while denoising: the largest the release's reset
rule allows). Random weights (timing does not depend on them, except the dynamic DiT-cache schedule, so the static
8-of-16 mask of the release is used).

Rows (impl names; ours start with "dz"): the baseline is the peer, each "dz..." row is cumulative:
  baseline              eager, 16 steps, sequential CFG, flash SDPA
  dz+cfg-batched        both CFG branches in one forward (on one GPU we batch)
  dz-cfg-parallel-2gpu-modelled   not cumulative: the paper's 2-GPU CFG-parallel row, MODELLED on one GPU as the
                        time of one branch (what each rank of cfg_mode='parallel' runs), the exchange not included
  dz+dit-cache          + the release's static DiT-cache mask (8 of 16 steps)
  dz+compile            + torch.compile of every block (CUDA graphs: mode reduce-overhead) -- CUDA only
  dz+kernels            + our attention, fused norms/modulation and fused KV-cache update, sampler on the GPU
  dz+fp8                + FP8 linears with fused quantization (Hopper)
  dz+flash              + DreamZero-Flash: 1 denoising step, actions only (the unconditional branch is skipped)
  dz+fused-control      + the replacement pass and the denoising step in one forward
The paper's cumulative ratios (H100 / GB200) are in PAPER; bench/results/<device>/stacked.md shows both, and the
GB200 column of our table is a roofline projection, labelled so (see project_gb200).
"""
from __future__ import annotations

from dreamzero.engine import Policy, PolicyConfig
from dz_bench.harness import Case, Unavailable, register
from dz_bench.peaks import PEAKS

from ._model_common import (ModelState, bench_config, episode_inputs, last_chunk_before_reset, random_model,
                            sdpa_backend)

PAPER = {  # paper Table 1, cumulative speedups
    "baseline": (1.0, 1.1), "dz+cfg-batched": (1.9, 1.8), "dz+dit-cache": (5.5, 5.4), "dz+compile": (8.9, 10.9),
    "dz+kernels": (9.6, 14.8), "dz+fp8": (None, 16.6), "dz+flash": (None, 38.0), "dz+fused-control": (None, None),
}

ROWS = [
    ("baseline", dict(), {}),
    ("dz+cfg-batched", dict(cfg_mode="batched"), {}),
    ("dz+dit-cache", dict(dit_cache="static"), {}),
    ("dz+compile", dict(compile="reduce-overhead"), {}),
    ("dz+kernels", dict(), {"kernels": True}),
    ("dz+fp8", dict(), {"quant": "fp8"}),
    ("dz+flash", dict(num_steps=1, actions_only=True, dit_cache="off"), {}),
    ("dz+fused-control", dict(fused_control=True), {}),
]

CPU_NOTE = ("a CPU smoke run of the tiny config: our Triton kernels run in the interpreter here, so the rows with "
            "them are not speed figures")


def project_gb200(h100_ms: float) -> float:
    """Roofline projection of a row measured on an H100 to one GB200 GPU at the same efficiency (compute bound): the
    measured time scaled by the ratio of the two dense bf16 peaks (dz_bench.peaks). A projection, not a measurement."""
    return h100_ms * PEAKS["H100"].bf16_flops / PEAKS["GB200"].bf16_flops


def report_extra(records: list) -> str:
    """The Table-1 view: each row's latency and speedup over our baseline beside the paper's cumulative ratios, and
    a GB200 column projected from the measured time (labelled a projection: only measured on the device named)."""
    rows = {r["impl"]: r for r in records if r.get("bench") == "stacked"}
    base = rows.get("baseline")
    if not base or base.get("status") != "ok":
        return ""
    on_h100 = "h100" in (base.get("device") or "").lower()
    lines = ["## Table 1 view", "",
             f"Measured on {base.get('device')}; speedups are over our baseline measured in the same run. "
             "The paper's ratios are its own (one GPU baseline, two GPUs for CFG parallelism)." +
             (" GB200 ms is a roofline PROJECTION (measured H100 time x H100/GB200 dense bf16 peak), not a "
              "measurement." if on_h100 else ""), "",
             "| row | ms per control step | speedup | paper H100 | paper GB200 |" + (" GB200 ms (projection) |"
                                                                                   if on_h100 else ""),
             "|---|---|---|---|---|" + ("---|" if on_h100 else "")]
    names = [n for n, _, _ in ROWS]
    names.insert(names.index("dz+cfg-batched"), MODELLED_2GPU)
    for name in names:
        r = rows.get(name)
        h, g = PAPER.get(name, (None, None))
        fmt = (lambda v: "-" if v is None else f"{v:g}x")  # noqa: E731
        if r is None or r.get("status") != "ok":
            why = "" if r is None else (r.get("unavailable") or r.get("error") or "")
            lines.append(f"| {name} | {why} | | {fmt(h)} | {fmt(g)} |" + (" |" if on_h100 else ""))
            continue
        ms = r["median_ms"]
        label = name + (" (MODELLED: one CFG branch, the all_gather not included; the paper's row 2)"
                        if name == MODELLED_2GPU else "")
        if name == MODELLED_2GPU:
            h, g = PAPER["dz+cfg-batched"]
        line = f"| {label} | {ms:.1f} | {base['median_ms'] / ms:.2f}x | {fmt(h)} | {fmt(g)} |"
        if on_h100:
            line += f" {project_gb200(ms):.1f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


MODELLED_2GPU = "dz-cfg-parallel-2gpu-modelled"


class _OneBranchPolicy(Policy):
    """The share of one GPU in 2-GPU CFG parallelism (cfg_mode='parallel' runs exactly this per rank, plus an
    all_gather of the velocities): only the conditional branch runs. A model of that row, not a measurement."""

    def _branches(self) -> list:
        return [0]


def _row_configs():
    acc_policy, acc_model = {}, {}
    for name, pol, mod in ROWS:
        acc_policy = {**acc_policy, **pol}
        acc_model = {**acc_model, **mod}
        yield name, dict(acc_policy), dict(acc_model)


@register("stacked")
def cases(ctx):
    batch = 1
    for name in [getattr(ctx, "model", None) or "droid-14b"]:        # `dz bench stacked --model droid-5b`
        state = {}

        def make(row, pol_kw, mod_kw, policy_cls=Policy):
            def factory():
                model = random_model(ctx, name)
                ms = state.setdefault("ms", ModelState(model))
                ms.restore()
                # on a CPU the compile and FP8 rows are unavailable and the rows below them run without them
                if row == "dz+compile" and ctx.device != "cuda":
                    raise Unavailable("the compile row (inductor + CUDA graphs) runs on CUDA only")
                if row == "dz+fp8" and ctx.device != "cuda":
                    raise Unavailable("FP8 linears run on CUDA only")
                if mod_kw.get("kernels"):
                    ms.use_kernels(ctx=ctx)
                if mod_kw.get("quant") and ctx.device == "cuda":
                    ms.quantize(mod_kw["quant"])
                cfg_kw = dict(pol_kw, negative_prompt=None)     # random features: zeros for the uncond branch
                if ctx.device != "cuda":
                    cfg_kw.pop("compile", None)
                policy = policy_cls(model, PolicyConfig(**cfg_kw))
                x = episode_inputs(model, batch)
                policy.reset(x["text"], x["clip"], x["first"])
                policy.step(None, x["state"])                   # chunk 1
                last = last_chunk_before_reset(model.cfg)
                for c in range(1, last - 1):                    # chunks 2 .. last - 1
                    policy.step(x["obs"][c - 1], x["state"])
                saved = {b: c.frames for b, c in policy.caches.items()}
                obs = x["obs"][last - 2]
                if row in ("baseline", MODELLED_2GPU):
                    backend = "flash"                           # the baseline's attention backend
                else:
                    backend = None if mod_kw.get("kernels") else "cudnn"

                def step():                                     # replacement of chunk last-1 + denoising of last
                    for b, c in policy.caches.items():
                        c.rewind(saved[b])
                    policy.chunk = last - 1
                    with sdpa_backend(ctx, backend):
                        return policy.step(obs, x["state"]).actions_raw
                return step
            return factory

        impls = {row: make(row, pk, mk) for row, pk, mk in _row_configs()}
        impls[MODELLED_2GPU] = make(MODELLED_2GPU, {}, {}, policy_cls=_OneBranchPolicy)
        bcfg = bench_config(ctx, name)                          # the config this run builds: tiny when small
        yield Case(case=f"{bcfg.name}-control-step-b{batch}", params={"config": bcfg.name,
                                                                      "batch": batch,
                                                                      "chunk": last_chunk_before_reset(bcfg),
                                                                      "paper_speedup_h100_gb200": PAPER,
                                                                      "note": CPU_NOTE if ctx.device == "cpu" else ""},
                   flops=None, bytes=None, impls=impls)
