"""Layout attention: fused block-sparse attention over an `AttentionPattern` (Triton forward and backward).

    out = layout_attention(q, k, v, pattern, scale=None, deterministic=False)

Where things are (the same places as in every op family of dz_kernels):
    ops.py            the public function (checks, the dense SDPA dispatch), the dz:: custom ops with their fake
                      implementations and autograd formula, the schedules' upload to the device
    triton_fwd.py     the forward kernel and its launcher
    triton_bwd.py     the backward kernels (delta, dk/dv with optional atomic dq, dq) and their launcher
    triton_common.py  the Triton device functions both share (dot, tile mask, non-finite rows) and the
                      row-flag kernel (which rows of an operand hold a NaN or an inf)
    reference.py      what the op computes, in plain PyTorch (the kernels' oracle)
    config.py         TileConfig and the config table lookup (dz_kernels/configs/attention.json)
    pattern.py        AttentionPattern: the generic who-sees-whom description a model hands over
    schedule.py       the tile schedules built from a pattern on the host
    compile_check.py  ahead-of-time compilation of every kernel for a GPU architecture (no GPU needed)

Importing this package is light (no torch or triton): `AttentionPattern` comes from pattern.py, and everything
else is loaded on first use, so a model can describe its masks without pulling in the kernels.
"""
from .pattern import AttentionPattern, as_pattern

__all__ = ["AttentionPattern", "as_pattern", "layout_attention", "layout_is_dense", "dense_blocks", "TileConfig",
           "default_config", "poison_outputs", "schedule_tensors", "build_schedule", "build_token_tables",
           "schedule_for", "token_tables", "tile_mask", "TileSchedule", "TokenTables", "config_choice", "config_mode",
           "layout_attention_reference"]

_LAZY = {
    "layout_attention": "ops", "layout_is_dense": "ops", "dense_blocks": "ops", "schedule_tensors": "ops",
    "TileConfig": "config", "default_config": "config", "config_choice": "config", "config_mode": "config",
    "build_schedule": "schedule", "build_token_tables": "schedule", "schedule_for": "schedule",
    "token_tables": "schedule", "tile_mask": "schedule", "TileSchedule": "schedule", "TokenTables": "schedule",
    "layout_attention_reference": "reference",
}


def __getattr__(name):
    if name == "poison_outputs":          # the one NaN-poisoning switch of dz_kernels, re-exported here
        from ..testing import poison_outputs

        return poison_outputs
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
