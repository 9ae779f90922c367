"""Reference evaluation models (transformers CLIPModel / ViTModel, open_clip CLIP) with seeded
random weights, the matching minidream configs, and the photos the evaluation tests read."""

import importlib
import importlib.util
import pathlib
import sys
import types
from pathlib import Path

import torch
import transformers

from minidream.config import CLIPConfig, TextEncoderConfig, VisionTransformerConfig

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth"

TINY_CLIP = CLIPConfig(
    vision=VisionTransformerConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_width=64),
    text=TextEncoderConfig(width=32, layers=2, heads=4, mlp_width=64),
    projection_dim=16,
)
TINY_DINO = VisionTransformerConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_width=64, activation="gelu", layer_norm_eps=1e-12)


def hf_vision_fields(cfg: VisionTransformerConfig) -> dict:
    return dict(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width, hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
    )


def hf_clip_config(cfg: CLIPConfig) -> transformers.CLIPConfig:
    text = cfg.text
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=text.vocab_size, max_position_embeddings=text.context_length, hidden_size=text.width,
            num_hidden_layers=text.layers, num_attention_heads=text.heads, intermediate_size=text.mlp_width,
            hidden_act=text.activation, layer_norm_eps=text.layer_norm_eps,
        ),
        vision_config=hf_vision_fields(cfg.vision),
        projection_dim=cfg.projection_dim,
        attn_implementation="eager",  # an independent implementation of attention, not SDPA again
    )


# Parameters that are looked up or added, not multiplied: unit variance.
TABLES = ("token_embedding.weight", "position_embedding.weight", "position_embeddings", "cls_token", "class_embedding")


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random values for every parameter, scaled so that every layer matters: unit-variance
    embeddings, matrices by 1/sqrt(fan-in), layer norms away from 1 and 0, biases non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith(TABLES):
                param.copy_(noise)
            elif param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def reference_clip(cfg: CLIPConfig, seed: int = 0) -> transformers.CLIPModel:
    return randomise(transformers.CLIPModel(hf_clip_config(cfg)), seed)


def reference_vit(cfg: VisionTransformerConfig, seed: int = 0) -> transformers.ViTModel:
    config = transformers.ViTConfig(**hf_vision_fields(cfg), attn_implementation="eager")
    return randomise(transformers.ViTModel(config, add_pooling_layer=True), seed)


def open_clip_model_module():
    """open_clip's `model` module without its package __init__, which imports torchvision (not a
    dependency here) for image transforms the tests do not use; one utility class is stubbed."""
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip.model"]
    root = pathlib.Path(importlib.util.find_spec("open_clip").origin).parent
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "open_clip")}
    sys.modules.update(
        {"torchvision": types.ModuleType("torchvision"), "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc}
    )
    package = types.ModuleType("open_clip")
    package.__path__ = [str(root)]
    sys.modules["open_clip"] = package
    try:
        return importlib.import_module("open_clip.model")
    finally:  # leave no stub behind for other tests
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()
