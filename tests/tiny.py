"""The suite's one tiny-model builder (`from tiny import tiny_model`; tests/ is on sys.path as the rootdir of
conftest.py)."""
from __future__ import annotations

import torch

from dreamzero.config import DreamZeroConfig, get_config
from dreamzero.dreamzero import DreamZero


def tiny_model(config: str | DreamZeroConfig = "tiny", *, seed: int = 0, std: float | None = 0.1,
               dtype: torch.dtype | None = None, **overrides) -> DreamZero:
    """A small DreamZero: `config` (a config name or a DreamZeroConfig) with `overrides` (config fields, e.g.
    num_layers=1, num_embodiments=1), built after torch.manual_seed(seed), cast to `dtype`, then every parameter
    drawn from N(0, std): Wan's init zeroes the output head, which would hide mistakes in most tests. std=None keeps
    Wan's init (what a freshly built model computes)."""
    if isinstance(config, str):
        cfg = get_config(config, **overrides)
    else:
        cfg = config.replace(**overrides) if overrides else config
    torch.manual_seed(seed)
    model = DreamZero(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
    return model
