"""The GPU path of the fused-op, KV-cache and quant kernels compiles for Hopper (sm_90, the H100/H200 the project
targets) on a machine without a GPU, and its static facts hold: every launch their public ops (and the quant
launchers) make at the bench's shapes (C = 5120, 40 heads x 128, 2 x 1785 rows, quant K = N = 5120 at M = 1785 and
16), recorded, specialized as Triton's launcher specializes it, and compiled by tests/aot_capture.py with this
machine's Triton (the interpreter runs the kernels but never compiles them). bf16 activations, the model's dtype,
with bf16 or float32 modulation and weights, FP8 outputs and caches; the GPU suite runs every dtype for real.

Static facts checked (ptxas -v and the PTX; nothing here is a speed):
- no kernel spills registers (the KV epilogue did, 136-1000 bytes a thread, before it loaded whole heads);
- no kernel moves its main tensor one element per instruction: its sub-word (1- or 2-byte) global access
  instructions must not outnumber its vector (>= 8-byte) ones, loads (ld.global and cp.async) and stores counted
  apart (the KV epilogue loaded bf16 pairs as 320 2-byte loads, the NVFP4 kernels read packed weights byte by byte).
The autotuned quant GEMMs are checked at every config their autotuners would time, and the tile candidates of the
quant tuning sweeps with them: the FP8 block-scaled GEMM's 256-wide tiles spilled 328 and 720 bytes, the W4A4
emulation's tiles up to 11 KB, and the FP8 GEMM sweep timed the autotuned kernel in place of its tile candidates,
before they were mended."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
QUANT = ["_fp8_quant_rows_kernel", "_fp8_quant_blocks_kernel", "_fp8_dequant_kernel", "_nvfp4_quant_kernel",
         "_nvfp4_dequant_kernel", "_nvfp4_w4a16_splitk_kernel", "_splitk_reduce_kernel", "_fp8_gemm_kernel",
         "_nvfp4_w4a16_kernel", "_nvfp4_w4a4_kernel"]
FUSED_KV = ["_ln_fwd_kernel", "_ln_bwd_kernel", "_gated_residual_fwd_kernel", "_gated_residual_bwd_kernel",
            "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_gelu_tanh_fwd_kernel", "_gelu_tanh_bwd_kernel",
            "_qk_norm_rope_kv_kernel", "_kv_write_kernel"]


def _narrow_vs_vector(hist: dict) -> tuple[int, int]:
    narrow = sum(n for b, n in hist.items() if int(b) < 4)
    vector = sum(n for b, n in hist.items() if int(b) >= 8)
    return narrow, vector


def test_every_fused_kv_cache_and_quant_launch_compiles_for_hopper_without_spills_or_scalar_loads(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "facts.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "aot_capture.py"), "fused", "kv_cache", "quant",
                        "--arch", "90", "--dtypes", "bf16", "--kernels", ",".join(FUSED_KV + QUANT),
                        "--json", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    records = json.loads(out.read_text())
    assert {rec["kernel"] for rec in records} == set(FUSED_KV + QUANT), r.stdout[-4000:]
    bad = []
    for rec in records:
        what = f"{rec['kernel']} {rec['blocks']} warps={rec['warps']} {rec['dtypes']}"
        if rec["spill_st"] or rec["spill_ld"]:
            bad.append(f"{what}: spills {rec['spill_st']}/{rec['spill_ld']} bytes (regs {rec['regs']})")
        loads = dict(rec["ld"])
        for b, n in rec["cp_async"].items():
            loads[b] = loads.get(b, 0) + n
        for kind, hist in (("loads", loads), ("stores", rec["st"])):
            narrow, vector = _narrow_vs_vector(hist)
            if narrow > vector:
                bad.append(f"{what}: {narrow} sub-word global {kind} against {vector} vector ones ({hist})")
    assert not bad, "\n".join(bad)
