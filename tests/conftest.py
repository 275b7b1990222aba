"""Test configuration shared by the whole suite.

On a machine without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """The suite's models and kernels are tiny: one intra-op thread is several times faster than several on a busy
    2-core machine (threads contend for the cores). Subprocess tests (torchrun) set their own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on a CPU with the reason)")
    config.addinivalue_line("markers", "slow: a longer test, still part of the default suite")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
