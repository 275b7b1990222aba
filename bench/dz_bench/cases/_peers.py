"""Helpers the case files share for peers and timing: a torch.compile peer that really compiles, CUDA-graph replay.

compile_peer(fn, *args): torch.compile(fn, fullgraph=True, dynamic=False) after torch._dynamo.reset(), so each case
compiles its own shape once: one code object compiled for several shapes in one process otherwise accumulates
recompiles until FailOnRecompileLimitHit (the first H200 run lost 11 fused-op peers that way). The first call
compiles; if it produced no graph (the function ran eagerly) or compilation failed, that is an error (raised as
RuntimeError: the harness records an error row), never a timed eager call under the compile peer's name.

graphed(run, ctx, params, impl): the call captured once in a CUDA graph and replayed (its outputs are the graph's
static outputs). Inference-shape cases time every impl this way: the model runs captured under CUDA graphs (the
paper's "torch.compile + CUDA Graphs" row), and for calls of tens of microseconds an eager timing measures the host
(Python dispatch, argument checks) rather than the kernel. An impl that cannot be captured is timed eagerly and
named in params["eager_timed"]. On a CPU, run itself.
"""
from __future__ import annotations

import torch

__all__ = ["compile_peer", "graphed"]


def compile_peer(fn, *args):
    """(compiled fn, first output): fn compiled for these args, called once; see the module doc."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    before = counters["stats"]["unique_graphs"]
    try:
        out = compiled(*args)
    except Exception as e:
        raise RuntimeError(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    if counters["stats"]["unique_graphs"] <= before:
        raise RuntimeError("torch.compile produced no graph for this call (it would run eagerly): not a compile "
                           "peer")
    return compiled, out


def graphed(run, ctx, params: dict | None = None, impl: str = ""):
    """A zero-argument callable replaying `run` from a CUDA graph (see the module doc)."""
    if ctx.device != "cuda":
        return run
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
    except Exception as e:
        torch.cuda.synchronize()
        if params is not None:
            params.setdefault("eager_timed", []).append(f"{impl}: graph capture failed ({type(e).__name__})")
        return run

    def replay():
        graph.replay()
        return out

    return replay
