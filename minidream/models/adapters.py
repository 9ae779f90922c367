"""The adapters beyond LoRA that LyCORIS files hold, and how a UI folds each into a weight: one
small pure function per formula, written as ComfyUI's `comfy/weight_adapter/{loha,lokr,base}.py`
and `comfy/lora.py` compute them (the client most users run), which agree with the LyCORIS
library (`lycoris/modules/{loha,lokr,locon}.py`) except where noted.

- LoHa (Hyeon-Woo et al. 2022, FedPara): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank,
  rank = the rows of w1_b; with CP/Tucker cores for convs, each factor is t ×₁ w_a ×₂ w_b.
- LoKr (Yeh et al. 2024, LyCORIS): ΔW = kron(W1, W2) · alpha / rank, each factor full or a
  low-rank product (W2 also Tucker); rank = that of W2 when it is factored, else of W1; no
  alpha or both factors full means scale 1.
- DoRA (Liu et al. 2024): a weight-decomposed adapter, a learned magnitude `dora_scale` times
  the direction of W0 + ΔW, in either axis convention (told apart by shape, ComfyUI PR #7727).
- full diffs (LyCORIS `full`): ΔW and Δb stored whole.

A file's alpha rules are ComfyUI's: no `.alpha` means scale 1, and strength s scales the change,
W0 + s·ΔW (for DoRA W0 + s·(W' − W0)). The LyCORIS library differs at s ≠ 1 for DoRA (it scales
the magnitude ratio) and, in its `get_merged_weight`, applies alpha/rank twice to LoHa and LoKr
(so it agrees with the UIs only at alpha = rank); docs/lora.md says so.
"""

from typing import NamedTuple

import torch

from minidream.models.lora import Adapter, lora_scale, weight_delta


class LoHa(NamedTuple):
    """A LoHa layer as a file holds it: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, and
    for a Tucker conv `hada_t1`, `hada_t2` (then w_a is rank x out and w_b rank x in)."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None
    t2: torch.Tensor | None
    alpha: float | None


class LoKr(NamedTuple):
    """A LoKr layer: each Kronecker factor is whole (`lokr_w1`, `lokr_w2`) or a product
    (`lokr_w1_a @ lokr_w1_b`, `lokr_w2_a @ lokr_w2_b`, or Tucker with `lokr_t2`)."""

    w1: torch.Tensor | None
    w1_a: torch.Tensor | None
    w1_b: torch.Tensor | None
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    t2: torch.Tensor | None
    alpha: float | None


class FullDiff(NamedTuple):
    """A full difference: `.diff` for the weight, `.diff_b` for the bias (either may be absent)."""

    diff: torch.Tensor | None
    diff_b: torch.Tensor | None


class Decomposed(NamedTuple):
    """DoRA: a LoRA, LoHa or LoKr whose result is renormalised to the learned `dora_scale`."""

    adapter: "Adapter | LoHa | LoKr"
    magnitude: torch.Tensor


Change = Adapter | LoHa | LoKr | FullDiff | Decomposed


def tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """core ×₁ w_aᵀ ×₂ w_bᵀ: out x in x kh x kw from a rank x rank x kh x kw core, w_a rank x out
    and w_b rank x in (LyCORIS `functional/general.py` rebuild_tucker; ComfyUI's einsum is the same)."""
    return torch.einsum("ij...,ip,jr->pr...", core, w_a, w_b)


def loha_product(loha: LoHa) -> torch.Tensor:
    """(w1_a @ w1_b) ⊙ (w2_a @ w2_b), or the Tucker factors' product, unscaled (fp32)."""
    w1_a, w1_b, w2_a, w2_b = (w.float() for w in loha[:4])
    if loha.t1 is not None:
        return tucker(loha.t1.float(), w1_a, w1_b) * tucker(loha.t2.float(), w2_a, w2_b)
    return (w1_a @ w1_b) * (w2_a @ w2_b)


def loha_scale(loha: LoHa) -> float:
    """alpha / rank of hada_w1_b; 1 without alpha (ComfyUI loha.py)."""
    return 1.0 if loha.alpha is None else loha.alpha / loha.w1_b.shape[0]


def lokr_product(lokr: LoKr) -> torch.Tensor:
    """kron(W1, W2), unscaled (fp32); a 2-D W1 against a conv's 4-D W2 acts on the channels only."""
    w1 = lokr.w1.float() if lokr.w1 is not None else lokr.w1_a.float() @ lokr.w1_b.float()
    if lokr.w2 is not None:
        w2 = lokr.w2.float()
    elif lokr.t2 is not None:
        # einsum's result is not contiguous, and torch.kron (2.13) then fails: ComfyUI's lokr.py
        # logs the error and leaves the weight unchanged; LyCORIS's make_kron makes it contiguous.
        w2 = tucker(lokr.t2.float(), lokr.w2_a.float(), lokr.w2_b.float()).contiguous()
    else:
        w2 = lokr.w2_a.float() @ lokr.w2_b.float()
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


def lokr_scale(lokr: LoKr) -> float:
    """alpha / rank, rank = the rows of lokr_w2_b when W2 is factored, else of lokr_w1_b; 1 without
    alpha or when both factors are whole (ComfyUI lokr.py; LyCORIS forces alpha = dim there)."""
    if lokr.w2 is None:
        rank = lokr.w2_b.shape[0]
    elif lokr.w1 is None:
        rank = lokr.w1_b.shape[0]
    else:
        rank = None
    return 1.0 if lokr.alpha is None or rank is None else lokr.alpha / rank


def weight_change(change: "Adapter | LoHa | LoKr", shape: torch.Size, strength: float) -> torch.Tensor:
    """strength · ΔW in `shape` (fp32): the factor is formed first, as ComfyUI multiplies
    (strength * alpha) into the product."""
    if isinstance(change, LoHa):
        return ((strength * loha_scale(change)) * loha_product(change)).reshape(shape)
    if isinstance(change, LoKr):
        return ((strength * lokr_scale(change)) * lokr_product(change)).reshape(shape)
    return weight_delta(change.down, change.up, strength * lora_scale(change.alpha, change.rank)).reshape(shape)


def magnitude_shape(magnitude: torch.Tensor, shape: torch.Size) -> torch.Size | None:
    """The shape `dora_scale` broadcasts as against a weight of `shape`: out x 1 x … when its first
    dimension is the weight's rows (per output, PEFT/LyCORIS), 1 x in x 1 … when it holds one value
    per input channel (OneTrainer/A1111); None when it is neither. A 1-D magnitude is read along
    the axis its length names (ComfyUI broadcasts those wrongly, its issue #12938)."""
    ones = [1] * (len(shape) - 1)
    if magnitude.shape[0] == shape[0] and magnitude.numel() == shape[0]:
        return torch.Size([shape[0], *ones])
    if magnitude.numel() == shape[1]:
        return torch.Size([1, shape[1], *ones[1:]])
    return None


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """W0 + s·(m · V / ‖V‖ − W0), V = W0 + ΔW (ComfyUI `weight_decompose`, base.py, since PR #7727).

    Per input column the norm is V's (the DoRA paper's, transposed as OneTrainer trains it); per
    output row ComfyUI divides by the rows of the *base* W0, not of V (LyCORIS and PEFT use V):
    that is what a UI shows, so it is what minidream merges. fp32 eps guards a zero norm, as there.
    """
    weight = weight.float()
    combined = weight + delta
    magnitude = magnitude.float().reshape(magnitude_shape(magnitude, weight.shape))
    if magnitude.shape[0] == weight.shape[0]:  # per output row
        norm = weight.flatten(1).norm(dim=1).reshape(magnitude.shape)
    else:
        norm = combined.transpose(0, 1).flatten(1).norm(dim=1).reshape(magnitude.shape)
    decomposed = combined * (magnitude / (norm + torch.finfo(torch.float32).eps))
    return decomposed if strength == 1.0 else weight + strength * (decomposed - weight)


def changed_weight(weight: torch.Tensor, change: Change, strength: float) -> torch.Tensor:
    """The weight after `change` at `strength`, in fp32 (a FullDiff's bias: io.adapter_files.merge_change)."""
    if isinstance(change, Decomposed):
        return dora_weight(weight, weight_change(change.adapter, weight.shape, 1.0), change.magnitude, strength)
    if isinstance(change, FullDiff):  # merge_change calls it only with a diff
        return weight.float() + strength * change.diff.float().reshape(weight.shape)
    return weight.float() + weight_change(change, weight.shape, strength)


def on_device(change: Change, device: torch.device | str) -> Change:
    """`change` with every tensor on `device` (the same kind; "meta" checks shapes for free)."""
    moved = [on_device(field, device) if isinstance(field, tuple) else
             field.to(device) if isinstance(field, torch.Tensor) else field for field in change]
    return type(change)(*moved)
