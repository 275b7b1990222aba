"""Compile Triton launches for a CUDA architecture this machine may not have (no GPU, no driver), and read the
static facts of the compiled code. The one place of it: dz_kernels.attention.compile_check, dz_kernels.quant._aot and
tests/aot_capture.py use it. Run with TRITON_INTERPRET=0 (the interpreter replaces @triton.jit functions by Python
ones that cannot be compiled; dz_kernels turns it on without CUDA when the variable is unset).

    with record_launches() as launches:      # Triton's launch replaced by a recorder: nothing runs
        some_op(cpu_tensors)                 # the op's own launchers, at the shapes to check
    records, failed = compile_launches(launches, arch=90)

Each distinct launch is specialized as Triton's own launcher specializes it (its binder: the 16-byte divisibility
of pointers and integers, integers equal to 1 made constant; the launch options num_warps, num_stages,
enable_fp_fusion), compiled to a cubin with Triton's bundled ptxas, and described by `ptx_facts` (ptxas -v and the
PTX): registers per thread, spill stores/loads (bytes per thread), MMA instructions, global loads and stores by
bytes per thread per instruction, cp.async / TMA copies; plus shared memory, the grid, programs resident per SM and
waves over the SMs. Facts of the compiled code, not timings.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections import Counter

N_SM = 132          # H100 SXM / H200


@contextlib.contextmanager
def record_launches():
    """Replace Triton's launch by a recorder for the block; yields the list it appends (kernel, args, kwargs, grid)
    to. An autotuned kernel records one launch per config the autotuner would time for the call (its list, after
    its early_config_prune)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs), grid))

    def record_all(self, *args, grid=None, warmup=False, **kwargs):
        named = self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        self.nargs = None
        for cfg in configs:
            kw = {**kwargs, **cfg.all_kwargs()}
            g = grid(named | kw) if callable(grid) else grid
            launches.append((self.fn, args, kw, g))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = record, record_all
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def specialize(fn, args, kw, backend) -> tuple:
    """(signature, constexprs, attrs, options) of one recorded launch, as JITFunction.run computes them."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return signature, constexprs, attrs, options


def occupancy(regs: int, warps: int, shared: int) -> int:
    """Programs resident per sm_90 multiprocessor: registers (allocated per warp in units of 256), threads, shared
    memory (227 KB per program at most, 228 KB per SM with 1 KB reserved per program), 32 programs."""
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 65536 // (warp_regs * warps)
    by_threads = 2048 // (32 * warps)
    by_smem = 233472 // (shared + 1024) if shared else 32
    return max(0, min(by_regs, by_threads, by_smem, 32))


def mma_instructions(ptx: str) -> list[str]:
    """The distinct tensor-core instructions of a kernel's PTX (tcgen05.mma, wgmma.mma_async, mma.sync)."""
    return sorted(set(re.findall(r"(tcgen05\.mma[\w.:]*|wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)))


_GLOBAL = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)+)")


def _access_bytes(mods: str) -> int:
    """Bytes one ld/st.global instruction moves per thread, from its modifiers (".v4.b32" -> 16, ".b16" -> 2)."""
    vec, bits = 1, 0
    for m in mods.split(".")[1:]:
        if re.fullmatch(r"v[248]", m):
            vec = int(m[1:])
        elif re.fullmatch(r"[bsuf](8|16|32|64)", m):
            bits = int(m[1:])
    return vec * bits // 8


def ptx_facts(ptx: str, arch: int) -> dict:
    """Static facts of one compiled kernel, from its PTX and ptxas -v (Triton's bundled ptxas for `arch`):
    regs (per thread), spill_st / spill_ld (bytes of spill stores / loads per thread), mma (distinct MMA
    instructions), ld / st ({bytes per thread per instruction: static count} of ld.global / st.global; a 16-bit
    element loaded one per instruction shows as 2), cp_async (static count of cp.async copies to shared memory, their
    byte sizes), tma (static count of bulk tensor copies)."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", src + ".o"],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {r.stderr[-2000:]}")

    def num(pattern):
        m = re.search(pattern, r.stderr)
        return int(m.group(1)) if m else 0

    acc = {"ld": Counter(), "st": Counter()}
    for op, mods in _GLOBAL.findall(ptx):
        acc[op][_access_bytes(mods)] += 1
    cp = Counter(int(n, 0) for n in re.findall(
        r"cp\.async\.c[ag]\.shared\.global[^\n;]*?\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx))
    return {"regs": num(r"Used (\d+) registers"), "spill_st": num(r"(\d+) bytes spill stores"),
            "spill_ld": num(r"(\d+) bytes spill loads"), "mma": mma_instructions(ptx),
            "ld": dict(sorted(acc["ld"].items())), "st": dict(sorted(acc["st"].items())),
            "cp_async": dict(sorted(cp.items())), "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx))}


def widths(hist: dict) -> str:
    """"16Bx8,4Bx11" from {bytes: count}."""
    return ",".join(f"{b}Bx{n}" for b, n in sorted(hist.items(), reverse=True)) or "-"


def compile_launches(launches: list, arch: int, dump: str | None = None, kernels=None,
                     verbose: bool = True) -> tuple[list, list]:
    """Compile each distinct launch for `arch`; returns (records, names of the kernels that failed). A record: kernel,
    warps, stages, shared, grid, programs, per_sm, waves, blocks (its BLOCK*/TILE*/NB* constants), consts (every
    constant argument by name), dtypes, and the ptx_facts. dump: a folder to write each variant's PTX into
    (<kernel>-<n>.ptx, n as in the records). kernels: compile only the kernels of these names (default: all).
    verbose: print one line per variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen, records, failed = set(), [], []
    for fn, args, kw, grid in launches:
        if kernels and fn.__name__ not in kernels:
            continue
        sig, consts, attrs, options = specialize(fn, args, kw, backend)
        key = (fn.__name__, repr(sorted(sig.items())), repr(sorted(consts.items())), repr(sorted(attrs.items())),
               repr(options))
        if key in seen:
            continue
        seen.add(key)
        warps, stages = options.num_warps, options.num_stages
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                               options=options.__dict__)
            facts = ptx_facts(k.asm["ptx"], arch)
        except Exception as e:  # noqa: BLE001 -- every failure is reported, then the status says so
            failed.append(fn.__name__)
            print(f"FAIL sm_{arch} {fn.__name__}: {type(e).__name__}: {str(e)[:600]}")
            continue
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        programs = 1
        for g in grid:
            programs *= int(g)
        occ = occupancy(facts["regs"], warps, k.metadata.shared)
        named = {fn.arg_names[c[0]]: v for c, v in consts.items() if len(c) == 1}
        blocks = {n: v for n, v in named.items() if n.startswith(("BLOCK", "TILE", "NB"))}
        dtypes = sorted({v[1:] for v in sig.values() if v.startswith("*")})
        rec = dict(kernel=fn.__name__, warps=warps, stages=stages, shared=k.metadata.shared, grid=list(grid),
                   programs=programs, per_sm=occ, waves=round(programs / max(1, occ * N_SM), 2), blocks=blocks,
                   consts={n: v for n, v in named.items() if isinstance(v, (bool, int, float, str))}, dtypes=dtypes,
                   **facts)
        records.append(rec)
        if dump:
            os.makedirs(dump, exist_ok=True)
            rec["ptx"] = os.path.join(dump, f"{fn.__name__}-{len(records) - 1}.ptx")
            with open(rec["ptx"], "w") as f:
                f.write(k.asm["ptx"])
        if verbose:
            print(f"ok   sm_{arch} {fn.__name__:30s} warps={warps:<2d} stages={stages} regs={facts['regs']:<3d} "
                  f"spill={facts['spill_st']}/{facts['spill_ld']} shared={k.metadata.shared} "
                  f"mma={'+'.join(m.split('.')[0] for m in facts['mma'][:1]) or '-'} ld={widths(facts['ld'])} "
                  f"st={widths(facts['st'])} cp.async={widths(facts['cp_async'])} tma={facts['tma']} "
                  f"grid={programs} per_sm={occ} waves={rec['waves']} {blocks} {','.join(dtypes)}", flush=True)
    return records, failed
