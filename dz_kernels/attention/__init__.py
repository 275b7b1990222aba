"""Layout attention: fused block-sparse attention over an `AttentionPattern` (Triton forward and backward).

    out = layout_attention(q, k, v, pattern, scale=None, deterministic=False)

Where things are: pattern.py (the generic who-sees-whom description: segments and a bit mask per query segment),
schedule.py (tile schedules built from a pattern on the host), _fwd.py / _bwd.py / _common.py (Triton kernels),
op.py (launchers and the torch.library custom ops), api.py (the public function, its checks and the dense SDPA
dispatch), compile_check.py (ahead-of-time compilation of every kernel for a GPU architecture).

Importing this package is light (no torch or triton): `AttentionPattern` comes from pattern.py, and everything
else is loaded on first use, so a model can describe its masks without pulling in the kernels.
"""
from .pattern import AttentionPattern, as_pattern

__all__ = ["AttentionPattern", "as_pattern", "layout_attention", "layout_is_dense", "dense_blocks", "TileConfig",
           "default_config", "poison_outputs", "schedule_tensors", "build_schedule", "build_token_tables",
           "schedule_for", "token_tables", "tile_mask", "TileSchedule", "TokenTables", "config_choice", "config_mode"]

_LAZY = {
    "layout_attention": "api", "layout_is_dense": "api", "dense_blocks": "api", "config_mode": "api",
    "TileConfig": "op", "default_config": "op", "config_choice": "op", "schedule_tensors": "op",
    "build_schedule": "schedule", "build_token_tables": "schedule", "schedule_for": "schedule",
    "token_tables": "schedule", "tile_mask": "schedule", "TileSchedule": "schedule", "TokenTables": "schedule",
}


def __getattr__(name):
    if name == "poison_outputs":          # the one NaN-poisoning switch of dz_kernels, re-exported here
        from ..testing import poison_outputs

        return poison_outputs
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
