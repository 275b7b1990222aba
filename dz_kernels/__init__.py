"""dz_kernels: fused Triton/CUDA kernels for DreamZero-style World Action Models.

Op families (each with kernels, a launcher, a torch.library custom op, a public function and a plain reference):
    dz_kernels.attention   layout attention over a DreamZero SequenceLayout, forward and backward
    dz_kernels.kv_cache    the KV cache and the fused q/k RMSNorm + RoPE + cache write (Triton and CUDA)
    dz_kernels.fused       LayerNorm + adaLN modulate, gated residual, RMSNorm, GELU-tanh (forward and backward)
    dz_kernels.quant       FP8 and NVFP4 quantization, quantized GEMMs, quantize_
One verb swaps them into a model:  dz_kernels.apply_(model, dz_kernels.ApplyConfig(...)).
Submodules are imported lazily, so `import dz_kernels` needs neither triton nor a GPU.

On a machine without CUDA, importing dz_kernels turns Triton's CPU interpreter on (TRITON_INTERPRET=1, when the
variable is unset and triton is not imported yet): the kernels then run on CPU tensors, correctly and slowly, with
nothing to set by hand. `INTERPRETER` says what happened (dz_kernels.env.interpret_without_cuda); "late" means
triton was imported first (diffusers and torch._dynamo import it), and apply_ then says what to do.
"""
from . import env as _env

__version__ = "0.1.0"
INTERPRETER = _env.interpret_without_cuda()

__all__ = ["apply_", "ApplyConfig", "ApplyHandle", "__version__"]


def __getattr__(name):
    if name in ("apply_", "ApplyConfig", "ApplyHandle"):
        from . import apply as _apply
        return getattr(_apply, name)
    raise AttributeError(f"module 'dz_kernels' has no attribute {name!r}")
