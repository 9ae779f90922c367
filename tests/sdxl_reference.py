"""The diffusers/transformers twin of a minidream SDXL pipeline, holding the same weights: the
oracle the SDXL tests compare against. Built in memory from minidream's modules through the
layout tables (io/diffusers_layout.py for the UNet and VAE, io/open_clip_layout.py for bigG),
independently of minidream's file readers and writers, which have their own tests."""

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from minidream.config import TextEncoderConfig
from minidream.io import open_clip_layout
from minidream.io.diffusers_layout import (
    unet_config_to_diffusers,
    unet_to_diffusers,
    vae_config_to_diffusers,
    vae_to_diffusers,
)
from minidream.models.pipeline import Pipeline


def spread_weights(pipe: Pipeline, seed: int = 0, std: float = 0.05) -> Pipeline:
    """Every weight and buffer of the pipeline drawn afresh (norm weights around 1), so that no
    zero-initialised layer or identity projection hides a wrong name or transpose."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, *pipe.text_encoders):
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if not tensor.is_floating_point() or tensor.ndim == 0:
                    continue
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std
                tensor.copy_(noise + 1 if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight")) else noise)
    return pipe


def clip_config(cfg: TextEncoderConfig, layers: int) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width, num_hidden_layers=layers,
        num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length, hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.width, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )


def clip_l(pipe: Pipeline) -> transformers.CLIPTextModel:
    cfg = pipe.config.text_encoder
    model = transformers.CLIPTextModel(clip_config(cfg, cfg.layers)).eval()
    state = {key.removeprefix("text_model."): tensor for key, tensor in pipe.text_encoder.state_dict().items()}
    model.load_state_dict(state, strict=True)  # transformers 5 names the modules without `text_model.`
    return model.to(next(pipe.text_encoder.parameters()).dtype)


def bigg(pipe: Pipeline) -> transformers.CLIPTextModelWithProjection:
    """diffusers' text_encoder_2: all of bigG's layers, and its projection as a Linear (weight P^T,
    where the SAI file holds P for x @ P)."""
    cfg = pipe.config.text_encoder_2
    model = transformers.CLIPTextModelWithProjection(clip_config(cfg, cfg.layers)).eval()
    ours = pipe.text_encoder_2.state_dict()
    model.load_state_dict(open_clip_layout.to_with_projection(ours, cfg.layers), strict=True)
    return model.to(ours["positional_embedding"].dtype)


def diffusers_unet(pipe: Pipeline) -> UNet2DConditionModel:
    cfg = pipe.config.unet
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"}
    model = UNet2DConditionModel.from_config(config).eval()
    model.load_state_dict(unet_to_diffusers(pipe.unet.state_dict(), cfg), strict=True)
    return model.to(pipe.dtype)


def diffusers_vae(pipe: Pipeline) -> AutoencoderKL:
    cfg = pipe.config.vae
    config = {k: v for k, v in vae_config_to_diffusers(cfg).items() if k != "_class_name"}
    model = AutoencoderKL.from_config(config).eval()
    model.load_state_dict(vae_to_diffusers(pipe.vae.state_dict(), cfg), strict=True)
    return model.to(next(pipe.vae.parameters()).dtype)


def diffusers_pipeline(pipe: Pipeline, tokenizer_folder, scheduler=None) -> StableDiffusionXLPipeline:
    """StableDiffusionXLPipeline over the same weights. tokenizer_folder: a transformers CLIP
    tokenizer folder (minidream's CLIPTokenizer().save_folder); tokenizer_2 pads with "!" (id 0),
    as SDXL's tokenizer_2 does. scheduler: None = SDXL's Euler from the pipeline's schedule."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder, pad_token="!")
    schedule = pipe.config.schedule
    if scheduler is None:
        scheduler = EulerDiscreteScheduler(
            beta_schedule=schedule.beta_schedule, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
            prediction_type=schedule.prediction_type, timestep_spacing=schedule.timestep_spacing or "leading",
            steps_offset=schedule.steps_offset,
        )
    return StableDiffusionXLPipeline(
        vae=diffusers_vae(pipe), text_encoder=clip_l(pipe), text_encoder_2=bigg(pipe), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=diffusers_unet(pipe), scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
