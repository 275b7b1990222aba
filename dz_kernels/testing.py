"""Helpers shared by the tests and the benchmark checks: NaN poisoning, error measures, precision bars."""
from __future__ import annotations

import contextlib
import math

import torch

from ._common import _POISON_OUTPUTS, poisoned

__all__ = ["poisoned", "poison_outputs", "cpu64", "on_cpu", "sqnr_db", "max_abs_err", "assert_within_lowp_bar"]


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """While active, every output buffer a dz_kernels launcher allocates (dz_kernels._common.empty) comes back filled
    with NaN instead of uninitialized, so an element a kernel fails to write shows up in the comparison."""
    old = _POISON_OUTPUTS[0]
    _POISON_OUTPUTS[0] = bool(enabled)
    try:
        yield
    finally:
        _POISON_OUTPUTS[0] = old


def cpu64(t: torch.Tensor) -> torch.Tensor:
    """t detached, on the CPU, in float64: where the float64 oracles and the error measures run, whatever device
    the kernel ran on."""
    return t.detach().to("cpu", torch.float64)


def on_cpu(fn, *args, **kwargs):
    """fn called with every tensor argument moved to the CPU (a reference run as the float64 oracle there)."""
    def move(v):
        return v.detach().cpu() if isinstance(v, torch.Tensor) else v
    return fn(*(move(a) for a in args), **{k: move(v) for k, v in kwargs.items()})


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10*log10(|ref|^2 / |ref - test|^2), computed in float64 on the
    CPU."""
    ref = cpu64(ref)
    test = cpu64(test)
    if not torch.isfinite(test).all():
        return -math.inf
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def max_abs_err(ref: torch.Tensor, test: torch.Tensor) -> float:
    """max |ref - test| in float64 on the CPU (inf when test holds a NaN or an infinity)."""
    ref = cpu64(ref)
    test = cpu64(test)
    if not torch.isfinite(test).all():
        return math.inf
    return (ref - test).abs().max().item()


def assert_within_lowp_bar(test: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, factor: float = 2.0,
                           atol: float = 1e-3, name: str = "output") -> None:
    """FlashAttention's bar: the kernel's max error against a float64 reference is at most `factor` times the error
    of the plain PyTorch computation in the same low precision, plus `atol`."""
    err = max_abs_err(ref64, test)
    base = max_abs_err(ref64, torch_lowp)
    bound = factor * base + atol
    assert err <= bound, f"{name}: max error {err:.3e} exceeds {factor}x PyTorch's own {base:.3e} + {atol:.1e}"
