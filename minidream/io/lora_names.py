"""The layers a LoRA file can adapt in each model family, the names the files give them, and the
family a file was made for (io/lora_files.py reads and writes the files).

Three model parts: "unet", "text_encoder" and, in SDXL, "text_encoder_2" (OpenCLIP ViT-bigG/14).
kohya prefixes them `lora_unet_`, `lora_te_` (SD 1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL;
sd-scripts networks/lora.py LORA_PREFIX_TEXT_ENCODER1/2), diffusers `unet.`, `text_encoder.`,
`text_encoder_2.`. kohya trains SD 1.x/2.x on diffusers' UNet, so those files use diffusers'
module paths, and SDXL on sgm's (library/sdxl_original_unet.py), so SDXL files use the SAI
paths, which are minidream's (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); both
spellings are read for every family. Text encoders are named as transformers' CLIPTextModel
(`text_model.encoder.layers.N.self_attn.q_proj`) in every layout; ComfyUI's
`model_lora_keys_clip` maps exactly these for CLIP-L and bigG.
"""

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from minidream.config import ModelConfig, TextEncoderConfig, UNetConfig
from minidream.io import open_clip_layout
from minidream.io.diffusers_layout import unet_names
from minidream.io.tensor_files import WeightsError
from minidream.models.clip import CLIPTextModel
from minidream.models.lora import lora_resblocks
from minidream.models.unet import UNet

DIFFUSERS_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
SD_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_PREFIXES = tuple({*SD_KOHYA_PREFIXES.values(), *SDXL_KOHYA_PREFIXES.values()})
TWO_ENCODERS = ("lora_te1_", "lora_te2_", "text_encoder_2.")  # the keys only SDXL files have
MODEL_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # by cross-attention width (the text encoding's)
TEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}  # by text-encoder width
# A `lora_te_` file's one text encoder, by width: the SDXL refiner has only bigG (ComfyUI maps its
# lora_te_ keys to clip_g).
ONE_ENCODER_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL refiner"}


class Layer(NamedTuple):
    """One adaptable layer: its minidream name, its diffusers name, its weight's shape."""

    minidream: str
    diffusers: str
    shape: torch.Size


def kohya_prefixes(cfg: ModelConfig) -> dict[str, str]:
    return SDXL_KOHYA_PREFIXES if cfg.is_sdxl else SD_KOHYA_PREFIXES


def unet_layers(cfg: UNetConfig) -> list[Layer]:
    """Every Linear/Conv2d of the UNet, named both ways through the diffusers key table."""
    with torch.device("meta"):
        model = UNet(cfg)
    diffusers = {name.minidream: name.diffusers for name in unet_names(cfg)}
    return [
        Layer(name, diffusers[f"{name}.weight"].removesuffix(".weight"), module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    ]


def text_encoder_layers(cfg: TextEncoderConfig) -> list[Layer]:
    """Every Linear of a text encoder; its names agree in both layouts, except in OpenCLIP's tower."""
    if cfg.open_clip:
        layers = open_clip_layout.lora_layers(cfg, lora_resblocks(cfg))
        return [Layer(ours, theirs, shape) for ours, (theirs, shape) in layers.items()]
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    return [Layer(name, name, module.weight.shape) for name, module in model.named_modules()
            if isinstance(module, nn.Linear)]


def model_layers(cfg: ModelConfig) -> dict[str, list[Layer]]:
    """The adaptable layers of each part of the model (`text_encoder_2` only in SDXL)."""
    layers = {"unet": unet_layers(cfg.unet), "text_encoder": text_encoder_layers(cfg.text_encoder)}
    if cfg.text_encoder_2 is not None:
        layers["text_encoder_2"] = text_encoder_layers(cfg.text_encoder_2)
    return layers


def kohya_module(part: str, layer: Layer, cfg: ModelConfig) -> str:
    """The module path kohya writes for `layer`: SAI's for an SDXL UNet, diffusers' otherwise."""
    return layer.minidream if part == "unet" and cfg.is_sdxl else layer.diffusers


def file_modules(part: str, layer: Layer, kohya: bool) -> set[str]:
    """Every module path a file may use for `layer`: a kohya UNet key diffusers' or the LDM/SAI
    path; a text encoder's with or without `text_model.` (transformers 5 dropped it from
    CLIPTextModel, so files written through it, kohya ones converted by diffusers too, lack it)."""
    if part == "unet":
        return {layer.diffusers, layer.minidream} if kohya else {layer.diffusers}
    return {layer.diffusers, layer.diffusers.removeprefix("text_model.")}


# ---- which family a file is for -------------------------------------------------------------------


def family(cfg: ModelConfig) -> str:
    name = "SDXL" if cfg.is_sdxl else MODEL_FAMILIES.get(cfg.unet.context_dim)
    return f"{name} ({cfg.unet.context_dim}-wide)" if name else f"a {cfg.unet.context_dim}-wide model"


def refuse_other_text_encoders(path: Path, tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """SDXL files name two text encoders, SD 1.x/2.x files one: the prefixes tell the family before
    any shape does (an SD 1.x text-encoder LoRA even fits SDXL's CLIP-L)."""
    two = next((marker for marker in TWO_ENCODERS if any(key.startswith(marker) for key in tensors)), None)
    if two and not cfg.is_sdxl:
        raise WeightsError(f"{path}: this is an SDXL LoRA ({two} keys: two text encoders); "
                           f"the base model is {family(cfg)}")
    # every adapted layer but fc2 reads the encoder's width, so the narrowest input is that width
    widths = [tensor.shape[1] for key, tensor in tensors.items()
              if key.startswith(SD_KOHYA_PREFIXES["text_encoder"]) and key.endswith(".lora_down.weight")]
    if widths and cfg.is_sdxl:
        name = ONE_ENCODER_FAMILIES.get(min(widths), "SD 1.x or 2.x")
        raise WeightsError(f"{path}: this is an {name} LoRA (lora_te_ keys: one {min(widths)}-wide text encoder); "
                           f"the base model is {family(cfg)}")


def refuse_other_widths(path: Path, found, shapes, cfg: ModelConfig) -> None:
    """A LoRA made for another family shows it in the width its cross-attention keys/values (or
    its text encoder) read; name that rather than list every mis-shaped key."""
    for (part, name), roles in found.items():
        if "down" not in roles:
            continue
        key, down = roles["down"]
        width, expected = down.shape[1], shapes[part, name][1]
        if width == expected:
            continue
        if part == "unet" and name.endswith(("attn2.to_k", "attn2.to_v")):
            raise WeightsError(
                f"{path}: this is {_family_name(MODEL_FAMILIES, width)} LoRA ({width}-wide cross-attention in "
                f"{key}); the base model is {family(cfg)}")
        if part != "unet":
            raise WeightsError(
                f"{path}: this is {_family_name(TEXT_FAMILIES, width)} LoRA ({width}-wide text encoder in "
                f"{key}); the base model is {family(cfg)}")


def _family_name(families: dict[int, str], width: int) -> str:
    name = families.get(width)
    return f"an {name}" if name else f"a {width}-wide model's"  # "an SD ...", "an SDXL"
