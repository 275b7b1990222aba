"""stacked: the paper's Table 1 on one device -- latency of a whole control step, each optimization added on top of
the ones above, every row measured in the same run and checked against a reference. The project's main job.

`dz bench stacked --model PRESET` runs another preset (dreamzero.config.PRESETS, e.g. droid-5b; default droid-14b),
small runs its tiny variant. One control step = ground-truth replacement of the chunk just executed + denoising of the next chunk + action
smoothing, at the cache position of the last chunk before the release's reset (droid-14b: chunk 4, 6160 cached
keys while denoising). Random weights, batch 1. A row's set-up fills the cache with the replacement passes of the
earlier chunks only (Policy.prefill: the cache holds observed frames alone, so its content is what running those
control steps would leave); every timed call rewinds the cache and replays the same step from the same noise.

Rows (impl names; ours start with "dz"). The baseline is the peer; each "dz+" row adds one switch to the row above:
  baseline          eager, 16 steps, sequential CFG (two forwards per step), flash SDPA, reference ops
  dz+cfg-batched    both CFG branches in one forward of batch 2 (the paper's 2-GPU CFG parallelism, on one GPU)
  dz+sdpa-cudnn     the SDPA backend switched from flash to cuDNN (a CPU has no backends: the same as above)
  dz+dit-cache      the release's static DiT-cache mask: 8 of 16 steps run the model, the others reuse its output
  dz+compile        torch.compile of the blocks (one graph per layout shared by every block) and each layout's
                    whole forward replayed as a CUDA graph from static buffers (dreamzero.compiled). CUDA: backend
                    inductor. CPU: the same design with backend aot_eager (the same dynamo graphs and buffers, no
                    code generation: inductor's C++ build takes minutes a graph there) and no capture
  dz+kernels        + our attention, fused norms/modulation/residual/GELU and the fused KV-cache write (apply_),
                    under the same compile and graphs (CPU: the Triton kernels in the interpreter)
  dz+fp8            + FP8 linears (quantize_: E4M3, per-token activations, per-channel weights); in inference the
                    norm before q/k/v (and before the FFN) quantizes once for its linears, in the fused norm's
                    epilogue (dreamzero.backend.Ops.layernorm_modulate_rows), where the FP8 path table does not pick
                    bf16 for the shape. CPU: Float8Linear's CPU path, quant/reference.py's bit-identical quantizer
                    with the GEMM in float32 (the Triton FP8 GEMM is the CUDA path)
  dz+flash          + DreamZero-Flash: 1 denoising step, actions only (the unconditional branch cannot change the
                    actions of a single step: it is skipped, so the batch is 1)
  dz+fused-control  + the replacement pass and the denoising step in one forward: the headline row (profiled on
                    CUDA: torch.profiler over one timed step, the kernels that take the time, in stacked.md)
  dz-full-output    the headline stack with both CFG branches and the video returned (the paper's full output)
The rows run in the order baseline, the two headline rows, then the others, so that a run cut by its time budget
keeps the headline. Small runs (the tiny config on a CPU, where the interpreter takes seconds a forward of our
kernels) use one block and 2 steps with the DiT-cache mask (run, reuse) in place of 40 blocks, 16 steps and the
release's mask.

Checks. Every row's first call (in compiled rows a graph replay: the set-up already compiled and captured) is
compared with a reference of the same algorithm made by the baseline's path (eager, sequential CFG, flash, reference
ops, the same model and noise): all steps (the baseline's own first call), the static DiT-cache mask, or 1 step (both
made in the baseline's set-up). The error of an output (actions, and video where the row returns it) is the RMS of
its difference from the reference over the RMS of the reference's displacement from the initial noise (the part the
model computed; the noise is the same in every row, Policy.initial_noise). A row fails (an error row, no time)
unless every error is within
    allowed = EXACT[dtype] + (FP8 if the row quantizes) + RESOLUTION[dtype] * rms(reference) / rms(displacement)
  EXACT, for the switches that compute the same function (batching, SDPA backend, compile, graphs, kernels, fused
    control, actions only): float32 1e-4 -- the tiny model on a CPU measures a few 1e-6; bfloat16 0.1 (20 dB)
    -- weights perturbed at bf16 rounding (relative 2^-9) move the displacement by 43-49 dB (0.004-0.007) at 2 to
    16 layers, which leaves 20 dB for rounding in the activations.
  FP8: 0.25 (12 dB) -- the tiny model measures 0.06-0.11 (19-24 dB), another random model about 1.0 (0 dB).
  RESOLUTION: bfloat16 2^-6, the sampler's state rounded to bf16 at each of up to 16 steps (a random walk of about
    2 ulps); float32 0.
A wrong computation fails: another random model gives about 1.0, a denoising step whose velocity is reused instead
of computed 0.2 (tests/test_stacked_bench.py). DiT caching and Flash change the algorithm itself: on random weights
their distance from the all-steps result says nothing of a trained model (a Flash model is trained for one step),
so it is recorded (params.check.schedule_err; the tiny model: 0.06 for the DiT cache at 16 steps, 0.4 for one step)
and not bounded.

Per-row params (the record's `params`): check (reference, errors, allowed, schedule_err); compile_s (the set-up's
first control step, which traces, compiles and captures every graph of the row, minus the first timed call: what a
user pays once per process), capture_s, graphs (layouts captured); on the profiled row profile and profile_wall_ms.

Time on one H200 (`bash scripts/bench.sh stacked`, within 8 minutes). Figures: the first H200 run (2026-11-29,
commit 81ca980): baseline 5388 ms a step, cfg-batched 4980 ms, the DiT-cache row 2661 ms, attention at the chunk
shape at B=2 1.314 ms with cuDNN against 2.096 ms with flash; the project's H100 run: a compiled 40-block forward at
B=2 203.5 ms, its torch.compile 100 s (140 s with FP8 linears). A row costs its set-up (prefill: 3 forwards;
compiled rows: one warm-up step that compiles and captures) + 7 calls (the checked first call, the harness's
estimate call, which is also the warm-up, and 5 timed calls):
  model build ~10 s; baseline 7 x 5.4 s + the references (an 8-of-16-step and a 1-step baseline call, ~3.5 s):
  ~52 s; cfg-batched 7 x 5.0 s: 35 s; sdpa-cudnn ~4.4 s a step (0.78 ms saved per attention call x 40 layers x
  17 forwards): 31 s; dit-cache 7 x 2.7 s: 19 s;
  compiled rows: each graph (one block, one layout) is an inductor compile, not measured yet; the 100 s of a
  40-block compile bound it, and 15-30 s a graph is assumed (the Triton kernels that rows share come from the
  cache). compile and kernels: 2 graphs each and ~1.8 s a step (9 forwards of ~0.2 s): ~45-75 s each; fp8 the
  same; flash: 2 graphs at B=1, ~0.25 s a step: ~35-65 s; fused-control and full-output: 1 graph each, ~20-35 s
  (+ ~3 s for the profile).
  In all about 330-480 s. The bench phase of scripts/gpu_run.sh passes --budget-s: no row starts after it (the
  rest are recorded as skipped), and the headline rows run first. A second run on the same machine compiles from
  inductor's on-disk caches. On a CPU the whole bench (tiny config) took 90 s of CPU time (one thread; 2 min 34 s
  of wall time on a 2-core machine shared with other jobs), most of it the interpreter running our kernels and
  dynamo tracing.
"""
from __future__ import annotations

import math
import time

import torch

from dreamzero.engine import Policy, PolicyConfig
from dz_bench.harness import Case, register
from dz_bench.peaks import PEAKS, peak_for

from ._model_common import ModelState, bench_config, episode_inputs, last_chunk_before_reset, random_model, \
    sdpa_backend

PAPER = {  # paper Table 1, cumulative speedups (H100, GB200); our rows that split or have no paper row: None
    "baseline": (1.0, 1.1), "dz+cfg-batched": (1.9, 1.8), "dz+sdpa-cudnn": (None, None), "dz+dit-cache": (5.5, 5.4),
    "dz+compile": (8.9, 10.9), "dz+kernels": (9.6, 14.8), "dz+fp8": (None, 16.6), "dz+flash": (None, 38.0),
    "dz+fused-control": (None, None), "dz-full-output": (None, None),
}

# (row, policy switches added, model switches added); each row keeps the switches of the rows above
ROWS = [
    ("baseline", dict(), dict(sdpa="flash")),
    ("dz+cfg-batched", dict(cfg_mode="batched"), {}),
    ("dz+sdpa-cudnn", dict(), dict(sdpa="cudnn")),
    ("dz+dit-cache", dict(dit_cache="static"), {}),
    ("dz+compile", dict(compile=True, graphs=True), {}),
    ("dz+kernels", dict(), dict(kernels=True)),
    ("dz+fp8", dict(), dict(quant="fp8")),
    ("dz+flash", dict(num_steps=1, actions_only=True, dit_cache="off"), {}),
    ("dz+fused-control", dict(fused_control=True), {}),
]
FULL_OUTPUT = "dz-full-output"          # the last row with both CFG branches and the video
PROFILED = "dz+fused-control"           # the row whose kernels are profiled (CUDA)
COMPILE_BACKEND = {"cuda": "inductor", "cpu": "aot_eager"}
# Small runs (the tiny config, one block, on a CPU, where the interpreter takes a second per forward of our
# kernels): 2 steps and the mask (run, reuse) stand for 16 steps and the release's 8-of-16 mask
SMALL_SCHEDULE = (2, (True, False))
SMALL_LAYERS = 1

# The check (module doc): allowed relative RMS error of the displacement
EXACT = {torch.float32: 1e-4, torch.bfloat16: 0.1}
FP8 = 0.25
RESOLUTION = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -6}

CPU_NOTE = ("a CPU run of the tiny config: the Triton kernels run in the interpreter, compile uses aot_eager "
            "without CUDA graphs, the SDPA backend switch is a no-op, FP8 runs Float8Linear's CPU reference: the "
            "times are not speed figures; the checks hold")


def row_configs(device: str, small: bool = False) -> list:
    """[(row, PolicyConfig keywords, model switches)] for every row, cumulative, FULL_OUTPUT last."""
    out, pol, mod = [], {}, {}
    for name, p, m in ROWS:
        pol, mod = {**pol, **p}, {**mod, **m}
        out.append((name, dict(pol), dict(mod)))
    out.append((FULL_OUTPUT, dict(pol, actions_only=False, cfg_mode="batched"), dict(mod)))
    rows = []
    for name, p, m in out:
        if p.pop("compile", False):
            p["compile"] = COMPILE_BACKEND[device]
        p["return_video"] = not p.get("actions_only", False)
        rows.append((name, _schedule(p, small), m))
    return rows


def _schedule(policy_kw: dict, small: bool) -> dict:
    """Small runs: SMALL_SCHEDULE in place of 16 steps and the release's mask."""
    if small and policy_kw.get("num_steps", 16) == 16:
        policy_kw = dict(policy_kw, num_steps=SMALL_SCHEDULE[0])
        if policy_kw.get("dit_cache") == "static":
            policy_kw["static_mask"] = SMALL_SCHEDULE[1]
    return policy_kw


def reference_name(policy_kw: dict) -> str:
    """The reference whose algorithm the row runs: all steps, the static DiT-cache mask, or 1 step."""
    if policy_kw.get("num_steps", 16) == 1:
        return "1-step"
    return "dit-cache" if policy_kw.get("dit_cache", "off") == "static" else "all-steps"


REFERENCES = {"all-steps": dict(), "dit-cache": dict(dit_cache="static"), "1-step": dict(num_steps=1)}


# ---------------------------------------------------------------------------------------------------- the check
def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def output_errors(out: dict, ref: dict, dtype: torch.dtype, fp8: bool) -> dict:
    """Errors of a row's outputs against a reference of the same algorithm (module doc). out, ref: {"actions",
    "video"} tensors (video None where the row returns none); ref also "noise_actions", "noise_video".
    Returns {name: {"err", "allowed"}} for each output the row returns, and "ok"."""
    res, ok = {}, True
    for name in ("actions", "video"):
        o = out.get(name)
        if o is None:
            continue
        r = ref[name].double()
        o = o.detach().double().cpu()
        disp = _rms(r - ref["noise_" + name])
        if disp == 0.0:
            raise ValueError(f"the reference's {name} equal the initial noise: nothing to check against")
        err = _rms(o - r) / disp
        allowed = EXACT[dtype] + (FP8 if fp8 else 0.0) + RESOLUTION[dtype] * _rms(r) / disp
        good = math.isfinite(err) and err <= allowed
        ok = ok and good
        res[name] = {"err": err, "allowed": allowed}
    res["ok"] = ok
    return res


class _Output:
    """What a row's timed call returns: its outputs for the check, and the call's wall time."""

    def __init__(self, row: str, actions: torch.Tensor, video: torch.Tensor | None, wall_s: float = 0.0):
        self.row, self.actions, self.video, self.wall_s = row, actions, video, wall_s


# ---------------------------------------------------------------------------------------------------- profile
def profile_table(prof, device: str, top: int = 15) -> str:
    """A Markdown table of what takes the time in a torch.profiler run: on CUDA the device events (kernels,
    copies; self device time, kernels replayed from CUDA graphs included), elsewhere the CPU ops (self CPU time),
    each with its share of their total."""
    from torch.autograd import DeviceType

    kind = DeviceType.CUDA if device == "cuda" else DeviceType.CPU

    def self_time(e):
        if device == "cuda":
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total

    rows = [(self_time(e), e.count, e.key) for e in prof.key_averages()
            if getattr(e, "device_type", DeviceType.CPU) == kind and self_time(e) > 0]
    rows.sort(key=lambda r: -r[0])
    total = sum(t for t, _, _ in rows)
    what = "GPU kernels and copies (self device time)" if device == "cuda" else "CPU ops (self CPU time)"
    lines = [f"{what}, one control step: {total / 1e3:.2f} ms in all", "",
             "| kernel | ms | calls | share |", "|---|---|---|---|"]
    for t, n, key in rows[:top]:
        name = key.replace("|", "/").replace("`", "'")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{name}` | {t / 1e3:.3f} | {n} | {100 * t / total:.1f}% |")
    return "\n".join(lines) + "\n"


def _profile(fn, ctx) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device == "cuda" else [])
    ctx.sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        ctx.sync()
    wall = (time.perf_counter() - t0) * 1e3
    return {"profile": profile_table(prof, ctx.device), "profile_wall_ms": wall}


# ---------------------------------------------------------------------------------------------------- report
def project_gb200(ms: float, device_name: str = "NVIDIA H100") -> float | None:
    """Roofline projection of a time measured on `device_name` to one GB200 GPU at the same efficiency (compute
    bound): the time scaled by the ratio of the two dense bf16 peaks (dz_bench.peaks). None for a device the peak
    table does not know. A projection, not a measurement."""
    peak = peak_for(device_name)
    if peak is None:
        return None
    return ms * peak.bf16_flops / PEAKS["GB200"].bf16_flops


def _check_cell(r: dict) -> str:
    chk = (r.get("params") or {}).get("check") or {}
    if r.get("impl") == "baseline":
        return "the reference"
    parts = [f"{k} {v['err']:.2g} <= {v['allowed']:.2g}" for k, v in chk.items()
             if isinstance(v, dict) and "err" in v]
    if chk.get("reference"):
        parts.append(f"vs {chk['reference']}")
    if chk.get("schedule_err") is not None:
        parts.append(f"schedule {chk['schedule_err']:.2g}")
    return "; ".join(parts)


def report_extra(records: list) -> str:
    """The Table-1 view: each row's latency, speedup over our baseline, its check and compile time beside the
    paper's cumulative ratios, a GB200 column projected from an H100/H200 run (labelled a projection), and the
    final row's profile."""
    rows = {r["impl"]: r for r in records if r.get("bench") == "stacked"}
    base = rows.get("baseline")
    if not base or base.get("status") != "ok":
        return ""
    device = base.get("device") or ""
    peak = peak_for(device)
    project = peak is not None and peak.bf16_flops == PEAKS["H100"].bf16_flops
    bp = base.get("params") or {}
    lines = ["## Table 1 view", "",
             f"Measured on {device} ({bp.get('config')}, {bp.get('schedule')}); speedups are over our baseline "
             "measured in the same run; every row's outputs are checked against a reference of the same algorithm "
             "(check: relative RMS error of the displacement <= allowed; schedule: the DiT cache's or one step's "
             "distance from all steps, recorded). The paper's ratios are its own (one GPU baseline, two GPUs for CFG "
             "parallelism)." + (f" Note: {bp['note']}." if bp.get("note") else "") +
             (f" GB200 ms is a roofline PROJECTION (the measured time x {device}'s / GB200's dense bf16 peak, "
              "dz_bench.peaks), not a measurement." if project else ""), "",
             "| row | ms per control step | speedup | check | compile s | paper H100 | paper GB200 |" +
             (" GB200 ms (projection) |" if project else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if project else "")]
    fmt = (lambda v: "-" if v is None else f"{v:g}x")  # noqa: E731
    for name in [n for n, _, _ in ROWS] + [FULL_OUTPUT]:
        r = rows.get(name)
        h, g = PAPER.get(name, (None, None))
        if r is None or r.get("status") != "ok":
            why = "not run" if r is None else f"{r.get('status')}: {r.get('unavailable') or r.get('error') or ''}"
            why = why.replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {name} | {why} | | | | {fmt(h)} | {fmt(g)} |" + (" |" if project else ""))
            continue
        ms = r["median_ms"]
        comp = (r.get("params") or {}).get("compile_s")
        line = (f"| {name} | {ms:.1f} | {base['median_ms'] / ms:.2f}x | {_check_cell(r)} | "
                f"{'' if comp is None else f'{comp:.1f}'} | {fmt(h)} | {fmt(g)} |")
        if project:
            line += f" {project_gb200(ms, device):.1f} |"
        lines.append(line)
    prof = rows.get(PROFILED)
    if prof and (prof.get("params") or {}).get("profile"):
        p = prof["params"]
        lines += ["", f"## Profile of {PROFILED}", "",
                  f"torch.profiler over one timed control step (wall {p.get('profile_wall_ms', 0):.1f} ms with the "
                  f"profiler on; median without it {prof['median_ms']:.1f} ms).", "", p["profile"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the case
@register("stacked")
def cases(ctx):
    batch = 1
    name = getattr(ctx, "model", None) or "droid-14b"
    cfg = bench_config(ctx, name)
    last = last_chunk_before_reset(cfg)
    configs = row_configs(ctx.device, ctx.small)
    num_layers = SMALL_LAYERS if ctx.small else None
    state: dict = {"refs": {}, "params": {}}

    def setup(pol_kw: dict, mod_kw: dict):
        """The model in the row's configuration and a policy prefilled up to the step that is timed."""
        if ctx.device == "cpu":
            torch.set_num_threads(1)    # tiny shapes: threads only contend for the cores of a small machine
        model = random_model(ctx, name, num_layers)
        ms = state.setdefault("ms", ModelState(model))
        ms.restore()
        if mod_kw.get("kernels"):
            ms.use_kernels(ctx=ctx)
        if mod_kw.get("quant"):
            ms.quantize(mod_kw["quant"])
        policy = Policy(model, PolicyConfig(**pol_kw))
        x = episode_inputs(model, batch)
        # random features: zeros for the unconditional branch's text (the negative prompt needs the umT5 encoder)
        policy.reset(x["text"], x["clip"], x["first"], negative_text=torch.zeros_like(x["text"]))
        policy.prefill(x["obs"][:last - 2])               # the first frame and chunks 1 .. last - 2 observed
        saved = {b: c.frames for b, c in policy.caches.items()}
        obs = x["obs"][last - 2]

        def step():                                    # replacement of chunk last - 1 + denoising of chunk last
            t0 = time.perf_counter()
            for b, c in policy.caches.items():
                c.rewind(saved[b])
            policy.chunk = last - 1
            with sdpa_backend(ctx, mod_kw.get("sdpa")):
                r = policy.step(obs, x["state"])       # returns after a device-to-host copy of the actions
            step.wall_s = time.perf_counter() - t0
            return _Output(step.row, r.actions_raw, r.video, step.wall_s)
        return policy, step

    def make(row: str, pol_kw: dict, mod_kw: dict):
        def factory():
            if row == "baseline":                       # the references of the other algorithms (module doc)
                state["refs"].clear()
                for ref, kw in REFERENCES.items():
                    if ref != "all-steps":              # all steps: the baseline's own first call (see check)
                        p, ref_step = setup(_schedule(dict(return_video=True, **kw), ctx.small), mod_kw)
                        ref_step.row = ref
                        state["refs"][ref] = _reference(ref_step(), p.initial_noise())
            policy, step = setup(pol_kw, mod_kw)
            step.row = row
            params = state["params"][row] = {}
            if row == "baseline":
                state["noise"] = policy.initial_noise()
            if pol_kw.get("compile") or pol_kw.get("graphs"):
                step()                                  # compiles and captures every graph of the step
                ctx.sync()
                params["warmup_s"] = step.wall_s        # compile_s = warmup_s - the first timed call (check)
                st = policy.compile_stats
                params.update(capture_s=st.get("capture_s"), graphs=st.get("graphs"))
                if st.get("capture_errors"):
                    params["capture_errors"] = st["capture_errors"]
            if row == PROFILED and ctx.device == "cuda":
                params.update(_profile(step, ctx))
            step.params = params                        # merged into this row's params by the harness
            return step
        return factory

    fp8_rows = {row for row, _, m in configs if m.get("quant") == "fp8"}
    refs_of = {row: reference_name(p) for row, p, _ in configs}

    def check(out: _Output) -> float:
        """The row's error against its reference (module doc); raises when it is outside the bound."""
        refs, params = state["refs"], state["params"][out.row]
        if "warmup_s" in params:
            params["compile_s"] = max(0.0, params.pop("warmup_s") - out.wall_s)
        if out.row == "baseline":
            refs["all-steps"] = _reference(out, state["noise"])
            full = refs["all-steps"]
            for ref in ("dit-cache", "1-step"):        # how far each algorithm is from all steps (recorded)
                refs[ref]["schedule_err"] = _rms(refs[ref]["actions"] - full["actions"]) / \
                    _rms(full["actions"] - full["noise_actions"])
            params["check"] = {"reference": "itself"}
            return 0.0
        ref_name = refs_of[out.row]
        if ref_name not in refs:
            raise RuntimeError(f"no {ref_name} reference: the baseline row did not run")
        ref = refs[ref_name]
        dtype = next(random_model(ctx, name, num_layers).parameters()).dtype
        res = output_errors({"actions": out.actions, "video": out.video}, ref, dtype, out.row in fp8_rows)
        outputs = {k: v for k, v in res.items() if k != "ok"}
        params["check"] = {"reference": ref_name, **outputs}
        if ref.get("schedule_err") is not None:
            params["check"]["schedule_err"] = ref["schedule_err"]
        if not res["ok"]:
            detail = ", ".join(f"{k} {v['err']:.3g} > allowed {v['allowed']:.3g}" for k, v in outputs.items()
                               if not v["err"] <= v["allowed"])
            raise AssertionError(f"check failed against the {ref_name} reference: {detail} (relative RMS of the "
                                 f"displacement)")
        return max(v["err"] for v in outputs.values())

    first = ["baseline", PROFILED, FULL_OUTPUT]           # a run cut by its budget keeps the headline rows
    order = first + [row for row, _, _ in configs if row not in first]
    by_row = {row: (p, m) for row, p, m in configs}
    impls = {row: make(row, *by_row[row]) for row in order}
    schedule = (f"{SMALL_SCHEDULE[0]} steps, mask {SMALL_SCHEDULE[1]}, {SMALL_LAYERS} block" if ctx.small
                else "16 steps, the release's mask")
    yield Case(case=f"{cfg.name}-control-step-b{batch}",
               params={"config": cfg.name, "batch": batch, "chunk": last, "schedule": schedule,
                       "compile_backend": COMPILE_BACKEND[ctx.device], "paper_speedup_h100_gb200": PAPER,
                       "note": CPU_NOTE if ctx.device == "cpu" else ""},
               flops=None, bytes=None, impls=impls, check=check)


def _reference(out: _Output, noise: tuple) -> dict:
    """A row's output as a reference: its actions and video in float64 on the host, with the initial noise."""
    return {"actions": out.actions.detach().double().cpu(),
            "video": None if out.video is None else out.video.detach().double().cpu(),
            "noise_video": noise[0].double().cpu(), "noise_actions": noise[1].double().cpu()}
