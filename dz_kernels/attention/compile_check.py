"""Compile the layout-attention kernels ahead of time for a CUDA architecture, without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never sees the GPU code path (bf16 tensor-core dots,
full-precision fp32 dots, atomics, shared-memory limits, registers). This calls the launchers of the forward and of
both backward passes (separate dq kernel, atomic dq) on empty CPU tensors at the droid-14b patterns (training mask
for the "train" tile config, the control step for "infer": forward only; 40 heads) with Triton's launch replaced by
a recorder (dz_kernels._aot), specializes each launch as Triton's launcher would at that shape, compiles it with
Triton's bundled ptxas for each dtype and head dim at the config table's tiles (dz_kernels/configs/attention.json),
and prints what each kernel needs: shared memory, registers per thread, the bytes of register spills (local-memory
stores) ptxas reports, and the matrix instruction its dots use (wgmma on sm_90, mma.sync otherwise):

    python -m dz_kernels.attention.compile_check [--arch 90] [--dtypes bf16,fp16,fp32] [--head-dims 16,32,64,128]
                                                 [--kernels fwd,...] [--modes train,infer] [--config JSON]
                                                 [--max-spill BYTES]

--config compiles one TileConfig given as a JSON object of its fields instead (e.g. '{"fwd_ws": true}' or
'{"fwd": [128, 128], "heads_first": true}'): how a tuning candidate is checked here before a GPU times it.
Spills are a fact of the compiled code, not a timing: a kernel that spills in its key loop moves hundreds of bytes
per thread through local memory on every tile. --max-spill fails (exit 1) when a kernel spills more than BYTES.
Run it with TRITON_INTERPRET=0: under the interpreter the kernels are interpreted functions, not compilable (and on
a machine without CUDA, dz_kernels turns the interpreter on when the variable is unset).
"""
from __future__ import annotations

import argparse
import sys

KERNELS = ("fwd", "row-flags", "preprocess", "dkdv", "dq", "dkdv-atomic-dq")

# The droid-14b patterns (dreamzero's layout_for_config(get_config("droid-14b"), ...).attention_pattern(), as plain
# data: the kernel library does not import the model; tests/test_attention_op.py checks they still agree):
# (q_lengths, k_lengths, rows) of the training mask and of the control step (chunk 5 with 7 cached frames).
_F, _A, _S = 880, 24, 1          # tokens of a video frame, an action block, a state block
DROID_14B = {
    "train": ((_F,) * 18 + (_A,) * 4 + (_S,) * 4, (_F,) * 18 + (_A,) * 4 + (_S,) * 4,
              (1, 7, 7, 31, 31, 127, 127, 511, 511, 512, 4459521, 4459521, 8925191, 8925191, 17874975, 17874975,
               35848319, 35848319, 4459521, 8925191, 17874975, 35848319, 4194304, 8388608, 16777216, 33554432)),
    "infer": ((_F,) * 4 + (_A, _S), (_F,) * 11 + (_A, _S), (511, 511, 8191, 8191, 8191, 8191)),
}
_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


def _kernel_name(fn: str, atomic_dq) -> str:
    """compile_check's name of a launch of the Triton kernel named `fn` (the dk/dv kernel is two: with and without
    atomic dq, its ATOMIC_DQ argument)."""
    if fn == "_bwd_dkdv_kernel":
        return "dkdv-atomic-dq" if atomic_dq else "dkdv"
    return {"_fwd_kernel": "fwd", "_row_flags_kernel": "row-flags", "_bwd_preprocess_kernel": "preprocess",
            "_bwd_dq_kernel": "dq"}[fn]


def record_attention(dtype, head_dim: int, config, mode: str = "train", heads: int = 40) -> None:
    """Call the launchers at the droid-14b pattern of `mode` ("train": the training mask, forward and both backward
    passes; "infer": the control step, forward) on empty CPU tensors, `heads` heads of `head_dim`, tiles `config`
    (a TileConfig). Meant to run under dz_kernels._aot.record_launches (nothing is launched there)."""
    import torch

    from .ops import schedule_tensors
    from .pattern import AttentionPattern
    from .triton_bwd import launch_backward
    from .triton_fwd import launch_forward

    pattern = AttentionPattern(*DROID_14B[mode])
    tiles = config.as_list()
    sched = schedule_tensors(pattern.key, tiles, "cpu")
    q = torch.empty(1, pattern.q_len, heads, head_dim, dtype=dtype)
    k, v = (torch.empty(1, pattern.k_len, heads, head_dim, dtype=dtype) for _ in range(2))
    scale = head_dim ** -0.5
    launch_forward(q, k, v, *sched[:3], *sched[4:6], sched[10], scale, tiles)
    if mode == "train":
        lse = torch.empty(1, heads, pattern.q_len)
        for deterministic in (True, False):
            launch_backward(q, q, k, v, q, lse, None, *sched[:4], *sched[6:10], scale, tiles, deterministic)


def compile_all(arch: int = 90, dtypes=("bf16", "fp16", "fp32"), head_dims=(16, 32, 64, 128), kernels=None,
                verbose=True, config: dict | None = None, max_spill: int | None = None,
                modes=("train", "infer")) -> list:
    """Compile each kernel (all, or those named in `kernels`) for each (dtype, head dim) at the table's configs of
    `modes` (or at TileConfig.from_dict(config)); returns [(kernel, dtype, head dim, record)], record as in
    dz_kernels._aot.compile_launches. Raises when a kernel needs more shared memory than the architecture has, or
    spills more than `max_spill` bytes."""
    from .._aot import compile_launches, record_launches
    from .._common import kernels_interpreted

    if kernels_interpreted():
        raise RuntimeError("compile_check needs TRITON_INTERPRET=0 (the kernels are interpreted functions under the "
                           "interpreter, which dz_kernels turns on without CUDA when the variable is unset)")
    import torch

    from .config import TileConfig, table_config

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    unknown = set(kernels or ()) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    results, seen = [], set()
    for dt in dtypes:
        for d in head_dims:
            with record_launches() as launches:
                for mode in modes:
                    tc = (TileConfig.from_dict(config) if config is not None else
                          table_config(f"sm{arch}", torch_dtype[dt], d, mode)[0])
                    tc.validate()
                    record_attention(torch_dtype[dt], d, tc, mode)
            if kernels:
                launches = [x for x in launches if _kernel_name(x[0].__name__, x[2].get("ATOMIC_DQ")) in kernels]
            records, failed = compile_launches(launches, arch, verbose=False)
            if failed:
                raise RuntimeError(f"{', '.join(failed)} ({dt}, D={d}) failed to compile for sm_{arch} (above)")
            for rec in records:
                name = _kernel_name(rec["kernel"], rec["consts"].get("ATOMIC_DQ"))
                ident = (name, dt, d, repr(rec["blocks"]), rec["warps"], rec["stages"])
                if ident in seen:          # the train and infer forwards differ only in their lengths
                    continue
                seen.add(ident)
                if verbose:
                    blocks = "x".join(str(b) for b in rec["blocks"].values())
                    mma = "+".join(sorted({"mma.sync" if m.startswith("mma.sync") else m.split(".")[0]
                                           for m in rec["mma"]})) or "-"
                    print(f"sm_{arch} {name:15s} {dt} D={d:<4d} {blocks:>7s} w{rec['warps']} s{rec['stages']} "
                          f"shared {rec['shared']:7d} B  regs {rec['regs']:3d}  spills {rec['spill_st']:5d} B  {mma}",
                          flush=True)
                limit = _SHARED_LIMIT.get(arch)
                if limit is not None and rec["shared"] > limit:
                    raise RuntimeError(f"{name} {dt} D={d} needs {rec['shared']} bytes of shared memory, over the "
                                       f"{limit} of sm_{arch}")
                if max_spill is not None and rec["spill_st"] > max_spill:
                    raise RuntimeError(f"{name} {dt} D={d} at {rec['blocks']} w{rec['warps']} s{rec['stages']} "
                                       f"spills {rec['spill_st']} bytes of registers on sm_{arch}, over --max-spill "
                                       f"{max_spill}")
                results.append((name, dt, d, rec))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--head-dims", default="16,32,64,128")
    parser.add_argument("--kernels", default=None, help=f"comma-separated subset of {','.join(KERNELS)} (default: "
                                                          "all)")
    parser.add_argument("--modes", default="train,infer", help="the config table's modes: train (the training mask, "
                                                               "forward and backward), infer (the control step)")
    parser.add_argument("--max-spill", type=int, default=None, help="fail when a kernel spills more than this many "
                                                                        "bytes of registers (default: report only)")
    parser.add_argument("--config", default=None, help="one TileConfig as a JSON object of its fields (default: "
                                                             "the config table's train and infer configs)")
    args = parser.parse_args(argv)
    config = None
    if args.config is not None:
        import json

        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as e:
            parser.error(f"--config is not valid JSON ({e}); example: --config '{{\"fwd\": [128, 128]}}'")
        if not isinstance(config, dict):
            parser.error("--config must be a JSON object of TileConfig fields")
        from .config import TileConfig

        try:
            TileConfig.from_dict(config).validate()
        except (ValueError, TypeError) as e:
            parser.error(f"--config: {e}")
    modes = tuple(args.modes.split(","))
    if set(modes) - {"train", "infer"}:
        parser.error(f"--modes takes train and/or infer, got {args.modes!r}")
    dtypes = tuple(args.dtypes.split(","))
    if set(dtypes) - {"bf16", "fp16", "fp32"}:
        parser.error(f"--dtypes takes bf16, fp16 and/or fp32, got {args.dtypes!r}")
    head_dims = tuple(args.head_dims.split(","))
    if set(head_dims) - {"16", "32", "64", "128"}:
        parser.error(f"--head-dims takes 16, 32, 64 and/or 128 (the kernels' head dims), got {args.head_dims!r}")
    head_dims = tuple(int(x) for x in head_dims)
    kernels = None if args.kernels is None else tuple(args.kernels.split(","))
    if kernels is not None and set(kernels) - set(KERNELS):
        parser.error(f"unknown kernels {sorted(set(kernels) - set(KERNELS))}; choose from {', '.join(KERNELS)}")
    try:
        compile_all(args.arch, dtypes, head_dims, kernels=kernels, config=config, max_spill=args.max_spill,
                    modes=modes)
    except RuntimeError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
