"""Imported first by every op family (attention, fused, kv_cache, quant), before any of their Triton kernels is
defined: on a machine without CUDA it turns Triton's CPU interpreter on (TRITON_INTERPRET=1) unless the variable was
given, so the kernels take CPU tensors (see dz_kernels.env.interpret_without_cuda)."""
from . import env

INTERPRETING = env.interpret_without_cuda()
