"""copy: a device-to-device copy of a large tensor, the memory-bandwidth ceiling the other benches are set against.

"dz" copies with the KV-cache row-write kernel (dz_kernels._ext.write_rows, offset 0 over the whole tensor): the
extension on CUDA, Unavailable elsewhere. The peer "torch-copy_" is torch's Tensor.copy_. bytes = read + write.
"""
from __future__ import annotations

import torch

from dz_bench.harness import Case, Unavailable, lazy, register

# (name, [B, T, H, D], dtype): full shapes move 256 MiB and 1 GiB per side; the small one is for CPU runs.
FULL = [
    ("bf16-256MiB", (1, 65536, 16, 128), torch.bfloat16),
    ("bf16-1GiB", (1, 262144, 16, 128), torch.bfloat16),
    ("fp32-1GiB", (1, 131072, 16, 128), torch.float32),
]
SMALL = [("fp32-256KiB", (1, 512, 8, 16), torch.float32)]


def _max_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    if torch.equal(ref, out):
        return 0.0
    return (ref.float() - out.float()).abs().max().item()  # nan when a NaN-poisoned element was not written


@register("copy")
def cases(ctx):
    for name, shape, dtype in SMALL if ctx.small else FULL:
        def make(shape=shape, dtype=dtype):
            src = torch.randn(shape, device=ctx.device).to(dtype)
            return src, torch.empty_like(src), torch.zeros(1, dtype=torch.int32, device=ctx.device)

        inputs = lazy(make)

        def dz():
            if ctx.device != "cuda":
                raise Unavailable("the dz copy kernel needs CUDA")
            from dz_kernels import _ext

            if _ext.cuda_ext() is None:
                raise Unavailable(f"dz_kernels._C: {_ext.cuda_ext_reason()}")
            src, dst, off = inputs()
            dst.fill_(float("nan"))
            return lambda: _ext.write_rows(dst, src, off, backend="cuda", check=False)

        def torch_copy():
            src, dst, _ = inputs()
            dst.fill_(float("nan"))
            return lambda: dst.copy_(src)

        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        yield Case(case=name, params={"shape": list(shape), "dtype": str(dtype).replace("torch.", "")},
                   flops=None, bytes=2 * nbytes, impls={"dz": dz, "torch-copy_": torch_copy},
                   check=lambda out, inputs=inputs: _max_err(inputs()[0], out))
