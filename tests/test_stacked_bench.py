"""The stacked bench (the paper's Table 1) on a CPU at the tiny shape: every row runs and is checked against a
reference of its algorithm, the check fails on a wrong computation, and the report shows the table, the compile
times, the GB200 projection and the final row's profile."""
import math

import pytest
import torch

from dreamzero.engine import Policy, PolicyConfig
from dz_bench import harness
from dz_bench.cases import stacked
from dz_bench.cases._model_common import episode_inputs, last_chunk_before_reset
from tiny import tiny_model


def test_every_row_runs_and_is_checked(tmp_path):
    ctx = harness.BenchContext(device="cpu", small=True, min_samples=1, cpu_max_reps=1, cpu_budget_s=0.0)
    records = harness.run_bench("stacked", ctx, progress=False, out_root=str(tmp_path))
    rows = {r["impl"]: r for r in records}
    names = [n for n, _, _ in stacked.ROWS] + [stacked.FULL_OUTPUT]
    assert sorted(rows) == sorted(names) and list(rows)[:3] == ["baseline", stacked.PROFILED, stacked.FULL_OUTPUT]
    bad = {n: r.get("error") or r.get("unavailable") for n, r in rows.items() if r["status"] != "ok"}
    assert not bad
    case = records[0]["case"]
    assert case == "tiny-control-step-b1" and records[0]["params"]["config"] == "tiny"
    for name, r in rows.items():
        chk = r["params"]["check"]
        if name == "baseline":
            assert chk == {"reference": "itself"} and r["max_err"] == 0.0
            continue
        outputs = [k for k in ("actions", "video") if k in chk]
        want_video = name not in ("dz+flash", "dz+fused-control")       # the actions-only rows return no video
        assert outputs == (["actions", "video"] if want_video else ["actions"])
        for k in outputs:
            assert 0.0 <= chk[k]["err"] <= chk[k]["allowed"]
        exact = name not in ("dz+fp8", "dz+flash", "dz+fused-control", "dz-full-output")
        assert chk["actions"]["allowed"] == pytest.approx(stacked.EXACT[torch.float32] +
                                                          (0.0 if exact else stacked.FP8))
        assert r["max_err"] == pytest.approx(max(chk[k]["err"] for k in outputs))
        if exact:
            assert r["max_err"] < 1e-4
        assert chk["reference"] == {"dz+cfg-batched": "all-steps", "dz+sdpa-cudnn": "all-steps"}.get(
            name, "1-step" if name in ("dz+flash", "dz+fused-control", "dz-full-output") else "dit-cache")
        compiled = names.index(name) >= names.index("dz+compile")
        assert ("compile_s" in r["params"]) == compiled
        if compiled:
            assert r["params"]["compile_s"] >= 0.0 and r["params"]["graphs"] == 0   # no capture on a CPU
    # the DiT cache's and one step's distance from all steps are recorded
    assert rows["dz+dit-cache"]["params"]["check"]["schedule_err"] > 0
    assert rows["dz+flash"]["params"]["check"]["schedule_err"] > 0
    md = stacked.report_extra(records)
    for name in names:
        assert f"| {name} | " in md
    assert "PROJECTION" not in md          # a CPU run has no GB200 column


@pytest.fixture(scope="module")
def references():
    """The tiny model's references as the bench makes them (fp32, 2 layers, 4 steps with a DiT-cache mask)."""
    model = tiny_model(num_embodiments=1, std=None).eval().requires_grad_(False)
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.02)
    x = episode_inputs(model, 1)
    refs = {name: _run(model, x, **kw) for name, kw in
            {"all": {}, "cache": dict(static_mask=(True, True, False, True)), "one": dict(num_steps=1)}.items()}
    return model, x, refs


def _run(model, x, **kw):
    kw = dict(dict(num_steps=4, return_video=not kw.get("actions_only")), **kw)
    pol = Policy(model, PolicyConfig(**kw))
    pol.reset(x["text"], x["clip"], x["first"], negative_text=torch.zeros_like(x["text"]))
    last = last_chunk_before_reset(model.cfg)
    pol.prefill(x["obs"][:last - 2])
    r = pol.step(x["obs"][last - 2], x["state"])
    noise = pol.initial_noise()
    return {"actions": r.actions_raw.double(), "video": None if r.video is None else r.video.double(),
            "noise_video": noise[0].double(), "noise_actions": noise[1].double()}


def _errors(out, ref, fp8=False):
    return stacked.output_errors({"actions": out["actions"], "video": out["video"]}, ref, torch.float32, fp8)


def test_exact_switches_pass_the_exact_bound(references):
    model, x, refs = references
    for kw, ref in ((dict(cfg_mode="batched"), "all"), (dict(cfg_mode="batched", fused_control=True), "all"),
                    (dict(static_mask=(True, True, False, True), cfg_mode="batched"), "cache"),
                    (dict(num_steps=1, actions_only=True), "one")):
        res = _errors(_run(model, x, **kw), refs[ref])
        assert res["ok"] and res["actions"]["err"] < 1e-5, (kw, res)


def test_a_wrong_computation_fails_the_check(references):
    """Another random model fails even the FP8 bound; a denoising step whose velocity is reused instead of
    computed (a skipped step), a NaN, or the video of the wrong schedule fail the exact bound."""
    model, x, refs = references
    other = tiny_model(num_embodiments=1, std=None, seed=7).eval().requires_grad_(False)
    with torch.no_grad():
        other.head.head.weight.normal_(0, 0.02)
    res = _errors(_run(other, x), refs["all"], fp8=True)
    assert not res["ok"] and res["actions"]["err"] > 0.5 and res["video"]["err"] > 0.5
    skipped = _run(model, x, static_mask=(True, True, True, False))
    res = _errors(skipped, refs["all"])
    assert not res["ok"] and res["actions"]["err"] > 100 * stacked.EXACT[torch.float32]
    bad = dict(refs["all"], actions=refs["all"]["actions"].clone())
    bad["actions"][0, 0, 0] = math.nan
    assert not _errors(bad, refs["all"])["ok"]
    assert not _errors(refs["cache"], refs["all"])["ok"]
    with pytest.raises(ValueError, match="initial noise"):
        _errors(refs["all"], dict(refs["all"], noise_actions=refs["all"]["actions"]))


def test_fp8_stays_within_its_bound(references):
    from dz_kernels.quant import Float8DynamicActivationFloat8Weight, dequantize_, quantize_

    model, x, refs = references
    quantize_(model, Float8DynamicActivationFloat8Weight())
    try:
        res = _errors(_run(model, x, num_steps=1), refs["one"], fp8=True)
    finally:
        dequantize_(model)
    assert res["ok"], res
    assert res["actions"]["err"] > stacked.EXACT[torch.float32]      # FP8 does change the result


def test_bf16_resolution_widens_the_allowed_error():
    ref = {"actions": torch.full((1, 2, 3), 4.0, dtype=torch.float64), "video": None,
           "noise_actions": torch.full((1, 2, 3), 3.0, dtype=torch.float64)}
    out = {"actions": torch.full((1, 2, 3), 4.0 + 2 ** -5), "video": None}
    exact = stacked.output_errors(out, ref, torch.float32, False)
    wide = stacked.output_errors(out, ref, torch.bfloat16, False)
    assert not exact["ok"] and wide["ok"]
    assert wide["actions"]["allowed"] == pytest.approx(0.1 + 2 ** -6 * 4.0)


def test_table_view_projection_and_profile():
    def rec(impl, ms, status="ok", **params):
        return {"bench": "stacked", "impl": impl, "status": status, "median_ms": ms, "device": "NVIDIA H200",
                "params": params, "error": None if status == "ok" else "boom", "unavailable": None}

    chk = {"reference": "1-step", "actions": {"err": 0.01, "allowed": 0.35}, "schedule_err": 0.4}
    records = [rec("baseline", 5000.0, check={"reference": "itself"}),
               rec("dz+compile", 500.0, compile_s=12.5, check=dict(chk, reference="dit-cache")),
               rec("dz+kernels", None, status="error"),
               rec("dz+fused-control", 100.0, compile_s=3.0, check=chk, profile="| `gemm` | 1.0 | 1 | 50% |\n",
                   profile_wall_ms=120.0)]
    md = stacked.report_extra(records)
    assert "| dz+compile | 500.0 | 10.00x | actions 0.01 <= 0.35; vs dit-cache; schedule 0.4 | 12.5 |" in md
    assert "| dz+kernels | error: boom |" in md and "| dz+fp8 | not run |" in md
    assert "PROJECTION" in md and f" {stacked.project_gb200(100.0, 'NVIDIA H200'):.1f} |" in md
    assert "## Profile of dz+fused-control" in md and "`gemm`" in md
    assert stacked.project_gb200(100.0, "NVIDIA H200") == pytest.approx(100.0 * 989 / 2500)
    assert stacked.project_gb200(100.0, "Some CPU") is None


def test_profile_table_from_a_cpu_profile():
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            torch.mm(a, a).relu_()
    table = stacked.profile_table(prof, "cpu", top=5)
    assert table.startswith("CPU ops (self CPU time), one control step:") and "| `aten::mm` |" in table
    assert len([line for line in table.splitlines() if line.startswith("| `")]) <= 5


def test_row_configs_are_cumulative():
    rows = {n: (p, m) for n, p, m in stacked.row_configs("cuda")}
    assert rows["baseline"] == (dict(return_video=True), dict(sdpa="flash"))
    p, m = rows["dz+fused-control"]
    assert p == dict(cfg_mode="batched", dit_cache="off", compile="inductor", graphs=True, num_steps=1,
                     actions_only=True, fused_control=True, return_video=False)
    assert m == dict(sdpa="cudnn", kernels=True, quant="fp8")
    p, _ = rows[stacked.FULL_OUTPUT]
    assert not p["actions_only"] and p["return_video"] and p["cfg_mode"] == "batched"
    small = {n: p for n, p, _ in stacked.row_configs("cpu", small=True)}
    assert small["baseline"]["num_steps"] == stacked.SMALL_SCHEDULE[0] and "static_mask" not in small["baseline"]
    assert small["dz+dit-cache"]["static_mask"] == stacked.SMALL_SCHEDULE[1]
    assert small["dz+flash"]["num_steps"] == 1 and small["dz+compile"]["compile"] == "aot_eager"
    assert stacked.reference_name(small["dz+kernels"]) == "dit-cache"
