"""OpenCLIP text-tower names (SD 2.x single files, `cond_stage_model.model.*`) <-> transformers'
`CLIPTextModel` names (SD 2.x diffusers folders, minidream's models/clip.py): the one table.

OpenCLIP fuses q, k and v into `attn.in_proj_weight` (3*width x width, rows in q, k, v order,
as torch's nn.MultiheadAttention) and has 24 resblocks, of which SD 2.x runs 23; diffusers
folders hold those 23 as a 23-layer transformers model. The last resblock, `text_projection`
and `logit_scale` have no transformers counterpart (diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
drops them too). diffusers' `convert_open_clip_checkpoint` is the oracle for this table
(tests/test_open_clip_layout.py).

SDXL's bigG is the other way round: diffusers folders hold all its layers as transformers'
`CLIPTextModelWithProjection` (`text_encoder_2/`), text_projection included, transposed.
"""

import dataclasses
import math

import torch

from minidream.config import TextEncoderConfig
from minidream.models.lora import IN_PROJ_SLICES

# OpenCLIP name -> transformers name, outside the layers.
OUTER = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Within `transformer.resblocks.N.` <-> `text_model.encoder.layers.N.`.
LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
FUSED = {  # one OpenCLIP tensor, split along dim 0 into these three
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
UNUSED = ("text_projection", "logit_scale")  # in every SD 2.x file, never read by SD


def open_clip_layer(n: int) -> str:
    return f"transformer.resblocks.{n}."


def transformers_layer(n: int) -> str:
    return f"text_model.encoder.layers.{n}."


def to_transformers(tensors: dict[str, torch.Tensor], resblocks: int, strict: bool = True) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's tensors (names without `cond_stage_model.model.`) as the
    (resblocks - 1)-layer transformers model that computes SD 2.x's states. strict=False leaves
    out what is missing and keeps what the table does not know under its own name, for the
    caller's check to name (UNUSED is dropped either way)."""
    out = {}
    for ours, theirs in renames(resblocks - 1).items():
        if ours in tensors or strict:
            out[theirs] = tensors[ours]
    for n in range(resblocks - 1):
        for ours, names in FUSED.items():
            if open_clip_layer(n) + ours in tensors or strict:
                for theirs, part in zip(names, tensors[open_clip_layer(n) + ours].chunk(3, dim=0)):
                    out[transformers_layer(n) + theirs] = part
    if not strict:
        known = {*UNUSED, *renames(resblocks - 1), *(open_clip_layer(n) + o for n in range(resblocks - 1) for o in FUSED)}
        out |= {key: tensor for key, tensor in tensors.items() if key not in known}
    return out


def renames(layers: int) -> dict[str, str]:
    """OpenCLIP name -> transformers name of every one-to-one tensor of a `layers`-layer model."""
    out = dict(OUTER)
    for n in range(layers):
        out |= {open_clip_layer(n) + ours: transformers_layer(n) + theirs for ours, theirs in LAYER.items()}
    return out


def to_open_clip(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `to_transformers` for a `layers`-layer transformers model: OpenCLIP's first
    `layers` resblocks and outer tensors (the unused last resblock and UNUSED are not made up)."""
    out = {ours: tensors[theirs] for ours, theirs in OUTER.items()}
    for n in range(layers):
        for ours, theirs in LAYER.items():
            out[open_clip_layer(n) + ours] = tensors[transformers_layer(n) + theirs]
        for ours, names in FUSED.items():
            out[open_clip_layer(n) + ours] = torch.cat([tensors[transformers_layer(n) + theirs] for theirs in names])
    return out


def lora_layers(cfg: TextEncoderConfig, resblocks: int) -> dict[str, tuple[str, torch.Size]]:
    """minidream's LoRA layer names in an OpenCLIP tower (models/lora.py) -> (transformers' module
    name, weight shape): the q/k/v row-blocks of in_proj_weight and the Linears, of the first
    `resblocks` (models.lora.lora_resblocks: those LoRA files name)."""
    square, fc, proj = (cfg.width, cfg.width), (cfg.mlp_width, cfg.width), (cfg.width, cfg.mlp_width)
    linears = {"attn.out_proj": square, "mlp.c_fc": fc, "mlp.c_proj": proj}
    out = {}
    for n in range(resblocks):
        for part, theirs in zip(IN_PROJ_SLICES, FUSED["attn.in_proj_weight"]):
            out[f"{open_clip_layer(n)}attn.{part}"] = (transformers_layer(n) + theirs.removesuffix(".weight"), torch.Size(square))
        for ours, shape in linears.items():
            theirs = LAYER[f"{ours}.weight"].removesuffix(".weight")
            out[open_clip_layer(n) + ours] = (transformers_layer(n) + theirs, torch.Size(shape))
    return out


def transformers_config(cfg: TextEncoderConfig) -> TextEncoderConfig:
    """The transformers-layout config computing what an OpenCLIP tower computes: one layer fewer
    (the last resblock never runs), the same clip_skip (both count from SD 2.x's layer)."""
    return dataclasses.replace(cfg, layers=cfg.layers - 1, open_clip=False)


# transformers' CLIPTextModelWithProjection holds text_projection as a Linear, weight P^T, where
# OpenCLIP (and SDXL's single files) hold P for x @ P: diffusers' convert_open_clip_checkpoint and
# ComfyUI's clip_text_transformers_convert transpose it (Stability-AI/generative-models#111).
PROJECTION = "text_projection.weight"
# A diffusers folder has no logit_scale (CLIP's contrastive temperature, unused by SDXL), which
# every SDXL single file carries: write CLIP's trained value, ln 100 (open_clip and OpenAI CLIP
# clamp it there in training; ComfyUI's default 4.6055 is this in fp16, as SAI's fp16 release holds it).
TRAINED_LOGIT_SCALE = math.log(100)


def to_with_projection(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A `layers`-resblock OpenCLIP tower (SDXL's bigG) as transformers' CLIPTextModelWithProjection:
    every layer, and the projection transposed; logit_scale has no place there."""
    return to_transformers(tensors, layers + 1) | {PROJECTION: tensors["text_projection"].T.contiguous()}


def from_with_projection(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `to_with_projection`, with CLIP's trained logit_scale, in the projection's dtype."""
    projection = tensors[PROJECTION]
    return to_open_clip(tensors, layers) | {
        "text_projection": projection.T.contiguous(),
        "logit_scale": torch.tensor(TRAINED_LOGIT_SCALE, dtype=projection.dtype),
    }
