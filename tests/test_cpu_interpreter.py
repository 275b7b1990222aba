"""The CPU rule (dz_kernels.env.interpret_without_cuda): without CUDA, `import dz_kernels` turns Triton's interpreter
on when nobody set TRITON_INTERPRET and triton is not imported yet; a value given is kept; a process that imported
triton first gets a clear error from apply_ instead of a failure inside a kernel. Each case in a fresh process."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the rule is for machines without CUDA")


def run(code: str, **env_over) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_over)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_import_turns_the_interpreter_on():
    p = run("import os, sys, dz_kernels\n"
            "assert dz_kernels.INTERPRETER == 'set' and os.environ['TRITON_INTERPRET'] == '1'\n"
            "assert 'triton' not in sys.modules\n"
            "import torch\n"
            "from dz_kernels.fused import rms_norm, rms_norm_reference\n"
            "x, w = torch.randn(3, 32), torch.randn(32)\n"
            "torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))\n")
    assert p.returncode == 0, p.stderr[-3000:]


def test_a_given_value_is_kept():
    p = run("import os, dz_kernels\nassert dz_kernels.INTERPRETER == 'given'\n"
            "assert os.environ['TRITON_INTERPRET'] == '0'\n", TRITON_INTERPRET="0")
    assert p.returncode == 0, p.stderr[-3000:]


def test_triton_imported_first_gets_a_clear_error_from_apply():
    p = run("import triton\nimport dz_kernels\nassert dz_kernels.INTERPRETER == 'late'\n"
            "from dreamzero.dreamzero import DreamZero\n"
            "dz_kernels.apply_(DreamZero('tiny'))\n")
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: apply_:") and "Import dz_kernels before them" in last, p.stderr[-2000:]
