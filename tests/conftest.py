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


# The one device rule of the suite: kernels run on CUDA when there is one, else on the CPU under the Triton
# interpreter. The same test bodies run on both; float64 oracles stay on the CPU. Test files import these two names
# (`from conftest import DEVICE, requires_cuda`) or take the `device` fixture.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")


@pytest.fixture
def device() -> torch.device:
    """The device a kernel test runs on: CUDA when present, else the CPU (Triton interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every output buffer a dz_kernels launcher allocates (dz_kernels._common.empty) comes back NaN-filled in every
    test, so an element a kernel fails to write fails the comparison."""
    from dz_kernels.testing import poison_outputs

    with poison_outputs():
        yield
