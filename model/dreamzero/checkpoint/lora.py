"""PEFT LoRA pairs in a DreamZero release's files: a LoRA-trained release wraps the DiT in PEFT
(`action_head.model.base_model.model.`, `q.base_layer.weight`, `q.lora_A.default.weight`, ...). The base weights load
as usual and each pair is merged into its weight on load: W += (lora_alpha / rank) * B @ A (PEFT's scale)."""
from __future__ import annotations

import json
import os
import re

import torch

# <module>.lora_A[.<adapter>].weight / <module>.lora_B[.<adapter>].weight
LORA_RE = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


def pair_lora(lora_parts: dict, tensors: dict, targets: dict) -> tuple:
    """Check the LoRA matrices found for each parameter: lora_parts maps our name -> {"A": key, "B": key}; tensors
    maps a key to its header info (`.shape`); targets our name -> the model's tensor. Returns (ours -> (A key, B key),
    list of problems): an incomplete pair, or shapes that do not give the weight's [out, in] (A [r, in], B [out, r])."""
    lora, problems = {}, []
    for ours, parts in sorted(lora_parts.items()):
        if set(parts) != {"A", "B"}:
            problems.append(f"incomplete LoRA pair for {ours}: only {sorted(parts.values())}")
            continue
        a, b = tensors[parts["A"]].shape, tensors[parts["B"]].shape
        out_f, in_f = tuple(targets[ours].shape) if targets[ours].dim() == 2 else (None, None)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or (out_f, in_f) != (b[0], a[1]):
            problems.append(f"mis-shaped LoRA pair for {ours}: A {list(a)}, B {list(b)}, weight "
                            f"{list(targets[ours].shape)}")
            continue
        lora[ours] = (parts["A"], parts["B"])
    return lora, problems


def lora_alpha_from_config(files) -> float | None:
    """lora_alpha from a release config.json beside the checkpoint (action_head_cfg.config.lora_alpha)."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(files[0])), "config.json")
    if not os.path.exists(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        ah = cfg.get("action_head_cfg", {})
        ah = ah.get("config", ah) if isinstance(ah.get("config"), dict) else ah
        return float(ah["lora_alpha"]) if "lora_alpha" in ah else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def merge_lora(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, lora_alpha: float) -> None:
    """weight += (lora_alpha / rank) * B @ A in place, in float32 on the weight's device (rank = A.shape[0])."""
    delta = (float(lora_alpha) / A.shape[0]) * (B.to(weight.device, torch.float32) @ A.to(weight.device, torch.float32))
    with torch.no_grad():
        weight.copy_((weight.float() + delta).to(weight.dtype))
