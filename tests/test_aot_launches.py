"""The GPU path of the fused-op and KV-cache kernels compiles for Hopper (sm_90, the H100/H200 the project targets), on
a machine without a GPU: every launch their public ops make, recorded and compiled by tests/aot_capture.py with this
machine's Triton (the interpreter runs the kernels but never compiles them; the attention and quant kernels have
their own checks, tests/test_attention_op.py and tests/test_quant_nvfp4.py). bf16 activations, the model's dtype,
with float32 modulation and weights, FP8 outputs and caches; the GPU suite runs every dtype for real."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_fused_and_kv_cache_launch_compiles_for_hopper():
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, os.path.join(HERE, "aot_capture.py"), "--arch", "90", "--dtypes", "bf16"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    compiled = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    kernels = {line.split()[2] for line in compiled}
    assert {"_ln_fwd_kernel", "_ln_bwd_kernel", "_gated_residual_fwd_kernel", "_gated_residual_bwd_kernel",
            "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_gelu_tanh_fwd_kernel", "_gelu_tanh_bwd_kernel",
            "_qk_norm_rope_kv_kernel", "_kv_write_kernel"} <= kernels, kernels
