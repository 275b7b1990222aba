"""Every script in examples/ runs as a user runs it (`python examples/<name>.py`, a fresh process that sets no
TRITON_INTERPRET) at the tiny size, and prints what it promises."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_every_example_is_tested_and_in_the_readme():
    here = Path(__file__).read_text()
    readme = (EXAMPLES.parent / "README.md").read_text()
    for script in sorted(EXAMPLES.glob("*.py")):
        assert f'"{script.name}"' in here, f"{script.name} has no test here"
        assert f"(examples/{script.name})" in readme, f"the README does not link {script.name}"


def test_train_export_serve_drive_an_episode(tmp_path):
    out = run_example("train_export_serve.py", "--out", tmp_path, "--steps", "10")
    assert "trained 10 steps" in out and "serving tiny-synthetic on ws://127.0.0.1:" in out
    assert "chunk 1: 24 actions" in out and "chunk 2: 24 actions" in out and out.rstrip().endswith("done")
    assert sorted(os.listdir(tmp_path / "export")) == ["SHA256SUMS", "dz_config.json", "dz_stats.json",
                                                      "model.safetensors"]


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers (the 'encoders' extra)")
def test_swap_kernels_into_diffusers_wan():
    out = run_example("swap_kernels_diffusers_wan.py", "--i2v")
    assert "I2V Wan, 2 blocks" in out and "outputs match; undo() restored diffusers' model exactly" in out


def test_quantize_to_modelopt(tmp_path):
    out = run_example("quantize_modelopt.py", "--out", tmp_path)
    assert "fp8: 24 linears quantized (FP8_PER_CHANNEL_PER_TOKEN)" in out and "nvfp4: 24 linears quantized (NVFP4)" in out
    assert out.count("reloaded: identical outputs") == 2
    for fmt in ("fp8", "nvfp4"):
        assert sorted(os.listdir(tmp_path / fmt)) == ["hf_quant_config.json", "model.safetensors"]


def test_bench_and_report(tmp_path):
    out = run_example("bench_and_report.py", "--bench", "kv_cache", "--out", tmp_path, "--small")
    assert "kv_cache on " in out and "report: " in out
    (slug,) = os.listdir(tmp_path)
    for ext in ("json", "md", "png"):
        assert (tmp_path / slug / f"kv_cache.{ext}").stat().st_size > 0
    if slug.startswith("cpu-"):
        assert "Small shapes, CPU: not speed figures." in out and "[Triton interpreter: not a speed figure]" in out
