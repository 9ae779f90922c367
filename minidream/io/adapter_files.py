"""LyCORIS tensors in a kohya-layout file (LoHa, LoKr, full diffs, DoRA's `dora_scale`), read
into minidream.models.adapters' kinds, and how one layer's change is merged into a model.

A LyCORIS file names its layers as kohya does (`lora_unet_…`, `lora_te_…`, `lora_te1_…`) and
holds, per layer, one adapter kind's tensors beside `.alpha` (lycoris/modules/*.py
`custom_state_dict`, the key names ComfyUI's `comfy/weight_adapter/*.py` `load` reads):
`hada_w1_a/_b`, `hada_w2_a/_b` [, `hada_t1/_t2`]; `lokr_w1` or `lokr_w1_a/_b`, `lokr_w2` or
`lokr_w2_a/_b` [, `lokr_t2`]; `diff` [, `diff_b`]; and any of LoRA, LoHa, LoKr may carry
`dora_scale`. Each layer's tensors are checked against the layer's shape without computing
anything (the formulas run on the meta device), so a file for another model is refused at read.
"""

from typing import NamedTuple

import torch
from torch import nn

from minidream.models.adapters import (
    Change,
    Decomposed,
    FullDiff,
    LoHa,
    LoKr,
    changed_weight,
    magnitude_shape,
    on_device,
    weight_change,
)
from minidream.models.lora import fold_into, layer_bias, layer_weight

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
DIFF_KEYS = ("diff", "diff_b")
# suffix -> role, beside kohya's lora_down/lora_up/alpha
LYCORIS_ROLES = {f".{key}": key for key in (*LOHA_KEYS, *LOKR_KEYS, *DIFF_KEYS, "dora_scale")}
KINDS = {"LoHa": LOHA_KEYS, "LoKr": LOKR_KEYS, "full diff": DIFF_KEYS, "LoRA": ("down", "up")}

Roles = dict[str, tuple[str, torch.Tensor]]  # role -> (the file's key, its tensor)


class Problem(NamedTuple):
    """What is wrong with one layer's tensors, for `mismatch`'s `missing` or `mis-shaped` list."""

    message: str
    missing: bool = False


def kind_of(roles: Roles) -> str | Problem:
    """The adapter kind a layer's tensors make, by their names (LoRA when only alpha/dora_scale)."""
    kinds = [kind for kind, keys in KINDS.items() if any(role in roles for role in keys)]
    if len(kinds) > 1:
        key = next(key for role, (key, _) in roles.items() if role in KINDS[kinds[0]])
        return Problem(f"{key} mixes {' and '.join(kinds)} tensors on one layer")
    return kinds[0] if kinds else "LoRA"


def lycoris_change(kind: str, roles: Roles, shape: torch.Size, alpha: float | None) -> Change | Problem:
    """The LoHa, LoKr or full diff of one layer of `shape`, or what is missing or mis-shaped."""
    tensors = {role: tensor for role, (_, tensor) in roles.items()}
    if kind == "LoHa":
        change = LoHa(*(tensors.get(key) for key in LOHA_KEYS), alpha)
        needed = [key for key in LOHA_KEYS[:4] if key not in tensors]
        needed += ["hada_t1 and hada_t2"] if ("hada_t1" in tensors) != ("hada_t2" in tensors) else []
    elif kind == "LoKr":
        change = LoKr(*(tensors.get(key) for key in LOKR_KEYS), alpha)
        needed = [f"{key} or {key}_a and {key}_b" for key in ("lokr_w1", "lokr_w2")
                  if key not in tensors and not (f"{key}_a" in tensors and f"{key}_b" in tensors)]
    else:
        return _full_diff(roles, shape)
    if needed:
        return Problem(f"{_any_key(roles)} has no {', '.join(needed)}", missing=True)
    return change if _fits(change, shape) else Problem(f"{_shapes(roles)}: not {list(shape)}")


def _full_diff(roles: Roles, shape: torch.Size) -> FullDiff | Problem:
    diff, diff_b = (roles[key][1] if key in roles else None for key in DIFF_KEYS)
    if (diff is not None and diff.numel() != shape.numel()) or (diff_b is not None and diff_b.numel() != shape[0]):
        return Problem(f"{_shapes(roles)}: not {list(shape)} (bias [{shape[0]}])")
    return FullDiff(diff, diff_b)


def with_magnitude(change: Change, roles: Roles, shape: torch.Size) -> Decomposed | Problem:
    """DoRA: `change` renormalised by the layer's `dora_scale` (one value per output row or per input)."""
    key, magnitude = roles["dora_scale"]
    if isinstance(change, FullDiff):
        return Problem(f"{key}: a full diff carries no DoRA magnitude")
    if magnitude_shape(magnitude, shape) is None:
        return Problem(f"{key} {list(magnitude.shape)}: neither {shape[0]} rows nor {shape[1]} inputs")
    return Decomposed(change, magnitude)


def _fits(change: Change, shape: torch.Size) -> bool:
    try:
        weight_change(on_device(change, "meta"), shape, 1.0)
    except RuntimeError:  # a product or reshape of the wrong sizes
        return False
    return True


def _any_key(roles: Roles) -> str:
    return next(iter(roles.values()))[0]


def _shapes(roles: Roles) -> str:
    return ", ".join(f"{key} {list(tensor.shape)}" for key, tensor in roles.values() if tensor.ndim)


@torch.no_grad()
def merge_change(model: nn.Module, name: str, change: Change, strength: float) -> None:
    """Fold one layer's change into `model` at `strength`, in fp32, rounded once to each tensor's dtype."""
    weight = layer_weight(model, name)
    change = on_device(change, weight.device)
    if not isinstance(change, FullDiff) or change.diff is not None:
        weight.copy_(changed_weight(weight, change, strength).to(weight.dtype))
    if isinstance(change, FullDiff) and change.diff_b is not None:
        bias = layer_bias(model, name)
        if bias is None:
            raise ValueError(f"layer {name} has no bias for the file's diff_b")
        fold_into(bias, strength * change.diff_b.float().reshape(bias.shape))  # ComfyUI's "diff" patch on the bias


def touched_tensors(model: nn.Module, name: str, change: Change) -> list[torch.Tensor]:
    """The tensors `merge_change` writes for this layer (to restore them afterwards)."""
    bias = layer_bias(model, name) if isinstance(change, FullDiff) and change.diff_b is not None else None
    return [layer_weight(model, name)] + ([bias] if bias is not None else [])
