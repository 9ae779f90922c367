"""A LoRA extracted from a full fine-tune: per layer, the best rank-r approximation of the
difference tuned − base (a truncated SVD, Eckart–Young), written as a kohya LoRA.

As kohya's networks/extract_lora_from_models.py does: each Linear's ΔW, and each conv's as the
out × in·kh·kw matrix (kohya's LoCon layout: `lora_down` is a kh×kw conv into r channels, `lora_up`
a 1×1 conv), is factored as U_r·diag(S_r) (up) and V_rᵀ (down), with `.alpha` = r so the scale is
1. Unlike kohya, no singular values are clamped: the file is the truncated SVD itself, so the
merged error is exactly the discarded part, ‖ΔW − ΔW_r‖_F = sqrt(Σ_{i>r} σ_i²). Everything is
fp32 on the pipelines' device; a layer whose difference is zero gets no adapter.
"""

from pathlib import Path
from typing import NamedTuple

import torch

from minidream.io.lora_files import LoRAFile, write_lora_file
from minidream.io.lora_names import model_layers
from minidream.models.adapters import on_device
from minidream.models.lora import Adapter, layer_weight, target_layers
from minidream.models.pipeline import Pipeline


class LayerFit(NamedTuple):
    """How well one layer's extracted adapter holds its difference."""

    part: str
    name: str
    rank: int
    kept_energy: float  # Σ_{i<=r} σ_i² / Σ σ_i²
    relative_error: float  # ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = sqrt(1 − kept_energy)


def truncated_svd(delta: torch.Tensor, rank: int | float) -> tuple[Adapter, float]:
    """The kohya LoRA (down, up, alpha = r) closest to `delta` (out x in [x kh x kw]) at rank r, and
    the energy it keeps. rank: an int r, or a float in (0, 1): the smallest r keeping that much energy."""
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energy = s.square()
    cumulative = energy.cumsum(0) / energy.sum()
    if isinstance(rank, float):
        r = int((cumulative < rank).sum().item()) + 1
    else:
        r = rank
    r = max(1, min(r, s.numel()))
    out, _, *kernel = delta.shape
    up = (u[:, :r] * s[:r]).reshape(out, r, *[1] * len(kernel))  # kohya puts S into up
    down = vh[:r].reshape(r, *delta.shape[1:])
    return Adapter(down, up, float(r)), cumulative[r - 1].item()


def extract_lora(tuned: Pipeline, base: Pipeline, rank: int | float, conv_rank: int | float) -> tuple[LoRAFile,
                                                                                                       list[LayerFit]]:
    """The truncated-SVD adapter, and its fit, of every layer LoRA training may target (`lora.targets=all`,
    kohya's LoCon set: what diffusers' load_lora_weights maps too) in the UNet and text encoders;
    3x3 convs at `conv_rank` (0: none), the rest at `rank`."""
    parts, fits = {}, []
    for part, layers in model_layers(tuned.config).items():
        parts[part] = {}
        tuned_model, base_model = getattr(tuned, part), getattr(base, part)
        targets = set(target_layers(tuned_model, "all"))
        for layer in (layer for layer in layers if layer.minidream in targets):
            is_conv = len(layer.shape) == 4 and layer.shape[2:] != (1, 1)
            layer_rank = conv_rank if is_conv else rank
            if not layer_rank:
                continue
            delta = (layer_weight(tuned_model, layer.minidream).detach().float()
                     - layer_weight(base_model, layer.minidream).detach().float())
            if not delta.any():
                continue
            adapter, kept = truncated_svd(delta, layer_rank)
            parts[part][layer.minidream] = on_device(adapter, "cpu")
            fits.append(LayerFit(part, layer.minidream, adapter.rank, kept, max(0.0, 1.0 - kept) ** 0.5))
    return LoRAFile(parts["unet"], parts["text_encoder"], {}, parts.get("text_encoder_2", {})), fits


def write_extracted_lora(path: str | Path, tuned: Pipeline, base: Pipeline, rank: int | float,
                         conv_rank: int | float, dtype: torch.dtype) -> list[LayerFit]:
    """Extract (see `extract_lora`) and write the kohya file atomically; returns each layer's fit."""
    if (tuned.config.unet, tuned.config.text_encoder, tuned.config.text_encoder_2) != (
            base.config.unet, base.config.text_encoder, base.config.text_encoder_2):
        raise ValueError(f"{path}: the tuned model and --base are different architectures; extract against "
                         "the model the fine-tune started from")
    lora, fits = extract_lora(tuned, base, rank, conv_rank)
    if not fits:
        raise ValueError(f"{path}: the tuned model equals --base in every adaptable layer; nothing to extract")
    write_lora_file(path, lora, tuned.config, "kohya", dtype,
                    {"ss_training_comment": f"extracted by minidream: truncated SVD, rank {rank}, conv rank {conv_rank}"})
    return fits
