"""The demo episode a `dz client --demo` runs: random features of the shapes a server asks for. Torch-free."""
from __future__ import annotations

import time

import numpy as np

from .client import PolicyClient


def random_request_arrays(meta: dict, batch: int, rng: np.random.Generator) -> dict:
    """Random float32 arrays of the shapes a server's metadata asks for, with the batch filled in: text, clip,
    first_latent, observation, state (and embodiment ids 0 when the model needs them)."""
    def make(name):
        shape = [batch if s == "B" else int(s) for s in meta["shapes"][name]]
        return rng.standard_normal(shape).astype(np.float32)

    out = {name: make(name) for name in ("text", "clip", "first_latent", "observation", "state")}
    if meta.get("embodiment_required"):
        out["embodiment"] = np.zeros(batch, dtype=np.int64)
    return out


def run_demo(client: PolicyClient, chunks: int = 3, batch: int = 1, seed: int = 0, out=print) -> list:
    """The demo episode: metadata, a reset with random features of the right shapes, then `chunks` steps (the
    first without an observation). Prints actions and latency; returns the step replies."""
    meta = client.metadata()
    out(f"server: model {meta['model']} on {meta['device']} ({meta['dtype']}), "
        f"{meta['policy_config'].get('num_steps', '?')} denoising step(s), "
        f"cfg {meta['policy_config'].get('cfg_mode', '?')}, actions {meta['shapes']['actions']}")
    rng = np.random.default_rng(seed)
    arr = random_request_arrays(meta, batch, rng)
    t0 = time.perf_counter()
    client.reset(arr["text"], arr["clip"], arr["first_latent"], embodiment=arr.get("embodiment"))
    out(f"reset: batch {batch}, {(time.perf_counter() - t0) * 1e3:.1f} ms round trip")
    replies = []
    for i in range(chunks):
        obs = None if i == 0 else rng.standard_normal(arr["observation"].shape).astype(np.float32)
        state = rng.standard_normal(arr["state"].shape).astype(np.float32)
        t0 = time.perf_counter()
        r = client.step(obs, state)
        rtt = (time.perf_counter() - t0) * 1e3
        a = r["actions"]
        out(f"step {i}: chunk {r['chunk']}, actions {list(a.shape)} {a.dtype}, round trip {rtt:.1f} ms, "
            f"server {r['latency_ms']:.1f} ms (policy {r['timings_ms'].get('total_ms', float('nan')):.1f} ms)")
        out("  actions[0, 0] = " + np.array2string(a[0, 0], precision=4, suppress_small=True, max_line_width=120))
        replies.append(r)
    lat = client.health()["metrics"]["step_latency"]
    out("server step latency: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in lat.items()))
    return replies
