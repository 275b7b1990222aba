"""Helpers shared by the tests and the benchmark checks: NaN poisoning, error measures, precision bars."""
from __future__ import annotations

import math

import torch


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer filled with NaN, so memory a kernel forgets to write fails the comparison."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-1 if t.dtype.is_signed else torch.iinfo(t.dtype).max)
    return t


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10*log10(|ref|^2 / |ref - test|^2), computed in float64."""
    ref = ref.detach().to(torch.float64)
    test = test.detach().to(torch.float64)
    if not torch.isfinite(test).all():
        return -math.inf
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def max_abs_err(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref = ref.detach().to(torch.float64)
    test = test.detach().to(torch.float64)
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
