"""transformers' CLIP text-encoder config.json (`text_encoder/`, SDXL's `text_encoder_2/`) <->
minidream's TextEncoderConfig, and what SDXL's encoders are beyond what that file says."""

import dataclasses

import torch

from minidream.config import TextEncoderConfig
from minidream.io import open_clip_layout
from minidream.io.tensor_files import meta_shapes
from minidream.models.open_clip_text import OpenCLIPTextModel

# transformers' CLIPTextConfig field -> TextEncoderConfig field
TEXT_ENCODER_FIELDS = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "context_length",
    "hidden_size": "width",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "mlp_width",
    "hidden_act": "activation",
    "layer_norm_eps": "layer_norm_eps",
    "eos_token_id": "eos_token_id",
}
TEXT_ENCODER_OPTIONAL = {"hidden_act", "layer_norm_eps", "eos_token_id"}  # absent: transformers' defaults = SD's
# SD 1.x's text_encoder/config.json predates real special-token ids and says eos_token_id=2;
# transformers then takes the largest id in each row, which is EOS (49407), the default here.
LEGACY_EOS_TOKEN_ID = 2
# How SDXL reads its encoders, which a transformers config.json does not say: CLIP-L's and bigG's
# penultimate states without the final norm, bigG as OpenCLIP's tower (models/open_clip_text.py).
SDXL_CONDITIONING = ("clip_skip", "final_norm", "open_clip")


def text_encoder_config_from_transformers(config: dict, with_projection: bool = False) -> TextEncoderConfig:
    """with_projection: a CLIPTextModelWithProjection (SDXL's bigG), whose projection is square."""
    missing = sorted(set(TEXT_ENCODER_FIELDS) - TEXT_ENCODER_OPTIONAL - config.keys())
    if missing:
        raise ValueError(f"missing text encoder config fields: {', '.join(missing)}")
    if with_projection and config.get("projection_dim") != config["hidden_size"]:
        raise ValueError(f"projection_dim {config.get('projection_dim')} is not hidden_size {config['hidden_size']}: "
                         "SDXL's bigG projects to its own width")
    values = {ours: config[theirs] for theirs, ours in TEXT_ENCODER_FIELDS.items() if theirs in config}
    if values.get("eos_token_id") == LEGACY_EOS_TOKEN_ID:
        del values["eos_token_id"]
    if values.get("activation", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported hidden_act {values['activation']!r}: expected quick_gelu (SD 1.x) or gelu")
    return TextEncoderConfig(**values)


def text_encoder_config_to_transformers(cfg: TextEncoderConfig, with_projection: bool = False) -> dict:
    """transformers' CLIPTextConfig as config.json; fields left out take transformers' defaults.
    clip_skip is a sampling option in diffusers, not part of this file. with_projection: SDXL's
    bigG as CLIPTextModelWithProjection."""
    fields = {theirs: getattr(cfg, ours) for theirs, ours in TEXT_ENCODER_FIELDS.items()}
    if not with_projection:
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **fields}
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", **fields,
            "projection_dim": cfg.width}


def sdxl_conditioning(parsed: TextEncoderConfig, sdxl: TextEncoderConfig) -> TextEncoderConfig:
    """A config read from a folder, read as SDXL reads that encoder (`sdxl`: SDXL's preset for it)."""
    return dataclasses.replace(parsed, **{name: getattr(sdxl, name) for name in SDXL_CONDITIONING})


def with_projection_shapes(cfg: TextEncoderConfig) -> dict[str, torch.Size]:
    """The names and shapes of the CLIPTextModelWithProjection that holds OpenCLIPTextModel(cfg)."""
    meta = {key: torch.empty(shape, device="meta") for key, shape in meta_shapes(OpenCLIPTextModel, cfg).items()}
    return {key: t.shape for key, t in open_clip_layout.to_with_projection(meta, cfg.layers).items()}
